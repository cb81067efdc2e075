"""Checks of the runtime's arguments and artifacts, off the per-call hot path.

- `as_int`: counts, batch sizes and seeds are integers (Python, numpy or 0-d torch integer
  scalars through `operator.index`); bool, float, str and tensors of other kinds are refused.
- `require_data`: a tensor must hold data (not the "meta" device).
- `check_part` / `check_graph`: an artifact's metadata (`export.manifest.artifact_metadata`)
  names the part it holds and the contract of its graph; both are compared with what the
  runtime was asked for and with the graph's own inputs and outputs (names, ranks, static
  dims, element types), so a mislabelled file is refused at load instead of failing per call.
- `decode_bytes` / `require_memory`: a lower bound on the memory a decode needs, compared with
  what the device has available before any work.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from engine.checkpoint import describe_out_of_memory
from engine.runtime.types import InputError, ModelSpec, SamplerError

SEEDS = range(-2**63, 2**64)  # what torch.Generator.manual_seed accepts
# A graph input/output as the checks see it: name, dims (an int when static, else its symbol
# or None), element type name.
TensorSig = tuple[str, tuple[int | str | None, ...], str]


# --- integers and tensors -----------------------------------------------------------------------
def describe(value: Any) -> str:
    """A short one-line description of any argument, for messages."""
    if isinstance(value, Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    text = repr(value).replace("\n", " ")
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def as_int(value: Any, what: str, minimum: int | None = None, valid: range | None = None) -> int:
    """`value` as an int: Python, numpy and 0-d torch integers pass (operator.index); bool,
    float (even 2.0), str and anything else raise an InputError naming `what`."""
    is_bool = isinstance(value, (bool, np.bool_)) or (isinstance(value, Tensor)
                                                       and value.dtype is torch.bool)
    try:
        if is_bool:
            raise TypeError
        v = operator.index(value)
    except (TypeError, RuntimeError):  # a float or multi-element tensor's __index__ raises either
        raise InputError(f"{what} must be an integer, got {describe(value)}") from None
    if minimum is not None and v < minimum:
        raise InputError(f"{what} must be >= {minimum}, got {v}")
    if valid is not None and v not in valid:
        raise InputError(f"{what} must lie in [{valid.start}, {valid.stop}), got {v}")
    return v


def parse_device(device: Any, what: str = "device") -> torch.device | None:
    """`None`, or "cpu" / "cuda" / "cuda:N" (a str or torch.device) as a torch.device."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"{what} {device!r} is not a device: expected cpu, cuda or cuda:N"
                         ) from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"{what} {device!r}: expected cpu, cuda or cuda:N")
    return dev


def check_device(device: Any, what: str = "device") -> None:
    """parse_device(), and a CUDA device must exist here."""
    dev = parse_device(device, what)
    if dev is None or dev.type == "cpu":
        return
    if not torch.cuda.is_available():
        raise InputError(f"{what} {device}: no CUDA GPU is visible here; use cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"{what} {device}: only {torch.cuda.device_count()} GPU(s) here")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def as_labels(labels: Any, n: int, num_classes: int) -> Tensor:
    """(n,) int64 CPU labels from one integer of any kind (every row) or n integers, each in
    [0, num_classes); anything else raises an InputError."""
    require_data(labels, "labels")
    if not isinstance(labels, (Tensor, Sequence, np.ndarray)) or getattr(labels, "ndim", 1) == 0:
        k = as_int(labels, "labels (one class for every row)", valid=range(num_classes))
        return torch.full((n,), k, dtype=torch.int64)
    try:
        y = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"expected integer labels of shape ({n},), got {describe(labels)}"
                         ) from None
    if y.shape != (n,) or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype is torch.bool:
        raise InputError(f"expected integer labels of shape ({n},), got {tuple(y.shape)}"
                         f" {dtype_name(y.dtype)}")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(f"labels must lie in [0, {num_classes}), got values in"
                         f" [{int(y.min())}, {int(y.max())}]")
    return y.to(torch.int64)


def extra_input(name: str, value: Any, z: Tensor, sigs: Sequence[TensorSig]) -> Tensor:
    """Extra decoder input `name` (e.g. a crystal's mask) as a tensor whose rank, static dims,
    dims named like the latent's ('atoms') and dtype match the graph's `sigs` (latent first);
    else an InputError. Without signatures only the conversion is checked."""
    require_data(value, f"decode(): input {name!r}")
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"decode(): input {name!r} must be a tensor, got {describe(value)}"
                         ) from None
    found = [sig for sig in sigs if sig[0] == name]
    if not found:
        return t
    (_, dims, dtype), zdims = found[0], sigs[0][1]
    named = {d: z.shape[i] for i, d in enumerate(zdims) if isinstance(d, str) and i < z.dim()}
    want = [d if isinstance(d, int) else named.get(d) for d in dims]
    if t.dim() != len(dims) or dtype_name(t.dtype) != dtype or any(
            w is not None and g != w for g, w in zip(t.shape[1:], want[1:])):
        shown = ", ".join("B" if i == 0 else str(w if w is not None else d)
                          for i, (w, d) in enumerate(zip(want, dims)))
        raise InputError(f"decode(): input {name!r} must be ({shown}) {dtype}, got"
                         f" {tuple(t.shape)} {dtype_name(t.dtype)}")
    return t


def require_data(t: Any, what: str) -> None:
    """Refuse a tensor on the "meta" device: it has a shape but no values to compute on."""
    if isinstance(t, Tensor) and t.is_meta:
        raise InputError(f"{what}: on the meta device (a shape without data): create it on"
                         " 'cpu' or 'cuda' (e.g. torch.randn(shape)) or .to_empty(device=...)"
                         " and fill it first")


# --- the artifact's own metadata against the graph ----------------------------------------------
def check_part(meta: dict[str, str], part: str, where: str) -> None:
    """Refuse an artifact whose metadata says it holds another part (an encoder given where the
    decoder is expected, or the reverse). Artifacts without the key pass (nothing to compare)."""
    found = meta.get("part", part)
    if found == part:
        return
    base = os.path.basename(where)
    suffix = base[base.index("."):] if "." in base else ".onnx"
    instead = os.path.join(os.path.dirname(where), f"{part}{suffix}")
    raise SamplerError(f"{where} holds the model's {found} (its metadata says part={found!r}), not"
                       f" the {part}: load {instead} (or the export directory"
                       f" {os.path.dirname(where) or '.'}) instead")


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _contract(spec: ModelSpec, part: str) -> list[tuple[str, str, int]]:
    """(metadata key, 'input'/'output', index) of each tensor whose shape the graph must agree
    with: a decoder's latent input and image output; an encoder's first output ((mu, logvar)
    and codes have the latent's shape; a latent-diffusion encoder's moments may not)."""
    if part == "decoder":
        return [("latent_shape", "input", 0), ("output_shape", "output", 0)]
    return [] if spec.spatial_factor else [("latent_shape", "output", 0)]


def check_graph(spec: ModelSpec, meta: dict[str, str], part: str, inputs: Sequence[TensorSig],
                outputs: Sequence[TensorSig], where: str) -> None:
    """Refuse metadata that contradicts the graph: input/output names, the rank and static dims
    of the latent and image tensors, and the latent's element type. One line names the key,
    the metadata's value and what the graph says."""
    fix = "the file was edited or mislabelled; re-export it (python -m export.onnx CKPT)"
    for key, sigs in (("input_names", inputs), ("output_names", outputs)):
        if key in meta and tuple(v for v in meta[key].split(",") if v) != tuple(s[0] for s in sigs):
            raise SamplerError(f"{where}: metadata {key}={meta[key]!r} but the graph's {key[:-6]}s"
                               f" are {','.join(s[0] for s in sigs)!r}; {fix}")
    for key, side, i in _contract(spec, part):
        sigs = inputs if side == "input" else outputs
        if key not in meta or len(sigs) <= i:
            continue
        want, (name, dims, _) = _dims(meta[key]), sigs[i]
        agree = len(dims) == 1 + len(want) and all(
            not isinstance(g, int) or g == w or (spec.spatial_factor and k >= 1)
            for k, (g, w) in enumerate(zip(dims[1:], want)))
        if not agree:
            shown = "(" + ", ".join(str(d) if isinstance(d, int) else "?" for d in dims) + ")"
            raise SamplerError(f"{where}: metadata {key}={meta[key]!r} but the graph's {side}"
                               f" {name!r} has shape {shown}; {fix}")
    latent = inputs if part == "decoder" else outputs if not spec.spatial_factor else []
    if "latent_dtype" in meta and latent and latent[0][2] != meta["latent_dtype"]:
        raise SamplerError(f"{where}: metadata latent_dtype={meta['latent_dtype']!r} but the"
                           f" graph's {latent[0][0]!r} is {latent[0][2]}; {fix}")


ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64",
             "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def ort_signature(args: Sequence[Any]) -> list[TensorSig]:
    """ONNX Runtime NodeArgs (name, shape with str/None for dynamic dims, 'tensor(float)')."""
    return [(a.name, tuple(None if isinstance(d, int) and d < 0 else d for d in a.shape),
             ORT_TYPES.get(a.type, a.type)) for a in args]


def binding_signature(names: Sequence[str], shapes: Sequence[Sequence[int]],
                      dtypes: Sequence[torch.dtype]) -> list[TensorSig]:
    """TensorRT bindings (engine.get_tensor_shape: -1 for a dynamic dim) in the same form."""
    return [(n, tuple(d if d >= 0 else None for d in s), str(t).removeprefix("torch."))
            for n, s, t in zip(names, shapes, dtypes)]


# --- memory ---------------------------------------------------------------------------------------
CHECK_FROM_BYTES = 64 << 20  # decodes needing less than this never query the free memory


def _full_res_channels(config: dict[str, Any]) -> int:
    """Channels of the widest maps a latent-diffusion decoder holds at full image resolution:
    the upsample into the last level and the 3x3 conv after it, both (B, c, H, W) and live at
    once. AutoencoderKL: block_out_channels[1] (its decoder runs the list reversed); TAESD:
    decoder_block_out_channels[-2] (decoder order). 0 when the config names neither."""
    tiny = config.get("decoder_block_out_channels")
    if tiny:
        return int(tiny[-2] if len(tiny) > 1 else tiny[-1])
    kl = config.get("block_out_channels")
    return int(kl[1] if len(kl) > 1 else kl[0]) if kl else 0


def decode_bytes(spec: ModelSpec, latent: Sequence[int], rows: int, itemsize: int = 4
                 ) -> tuple[int, int]:
    """(output bytes, activation bytes): a LOWER BOUND on the memory decoding `rows` latents of
    shape `latent` (per row) needs at once, so a refusal is never wrong.

      outputs      rows * prod(image) * 4                  (float32 images, kept to the end)
      activations  latent-diffusion VAEs: 2 * rows * c * H * W * itemsize, the two full-
                   resolution maps of `_full_res_channels` (H, W = spatial_factor * h, w);
                   other families: rows * prod(latent) * itemsize (the input itself).
    The real peak is higher (weights, a resnet's third map, allocator slack; diffusers-style
    attention at the latent resolution adds (h w)^2 per head unless a fused kernel runs)."""
    if spec.spatial_factor and len(latent) == 3:
        f, (h, w) = spec.spatial_factor, latent[1:]
        image = (spec.output_shape[0], f * h, f * w)
        act = 2 * rows * _full_res_channels(spec.config) * f * h * f * w * itemsize
    else:
        image, act = spec.output_shape, rows * math.prod(latent) * itemsize
    return rows * math.prod(image) * 4, act


def _cpu_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_bytes(device: torch.device) -> int | None:
    """Memory a decode can still allocate on `device`: CPU: MemAvailable (/proc/meminfo, else
    sysconf's free pages); CUDA: the driver's free memory plus what torch's caching allocator
    holds unused. None when unknown (then nothing is refused)."""
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if device.type == "cpu":
            return _cpu_available()
    except (OSError, ValueError, RuntimeError):
        return None
    return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.3f} MB"


def encode_bytes(spec: ModelSpec, image: Sequence[int], rows: int) -> tuple[int, int]:
    """(input bytes, activation bytes): a LOWER BOUND on the memory encoding `rows` images of
    shape `image` needs at once: the float32 contiguous copy a backend is fed
    (rows * prod(image) * 4) and, for latent-diffusion VAEs, the two full-resolution maps of
    the encoder's first level (2 * rows * c0 * H * W * 4)."""
    size = rows * math.prod(image) * 4
    first = spec.config.get("encoder_block_out_channels") or spec.config.get("block_out_channels")
    act = 2 * rows * int(first[0]) * math.prod(image[1:]) * 4 if spec.spatial_factor and first \
        else 0
    return size, act


def require_memory(spec: ModelSpec, latent: Sequence[int], rows: int, device: torch.device,
                   what: str, itemsize: int = 4, out_rows: int | None = None) -> None:
    """Refuse, before any work, a decode of `rows` latents at once whose lower-bound need
    (`decode_bytes`; outputs for `out_rows` rows when they are allocated for more) exceeds the
    memory available on `device`. Cheap below CHECK_FROM_BYTES: no system query."""
    out, act = decode_bytes(spec, latent, rows, itemsize)
    job = f"decoding {rows} rows of {tuple(latent)} at once"
    fix = "decode fewer rows at a time (batch_size=, --batch-size)"
    if out_rows is not None and out_rows != rows:
        out = out // max(rows, 1) * out_rows
        job = f"{out_rows} samples ({rows} rows decoded at a time)"
        fix = f"ask for fewer samples per call (n, --n) or {fix}"
    if spec.spatial_factor:
        fix += (" or tile it (model.tiled_decode(z, tile_size=64); python -m engine.sample"
                " decode ... --tile 64)")
    _refuse_short(what, job, {"outputs": out, "decoder activations": act}, device, fix)


def require_encode_memory(spec: ModelSpec, image: Sequence[int], rows: int,
                          device: torch.device) -> None:
    """require_memory for encode(): `encode_bytes` against the memory available on `device`."""
    size, act = encode_bytes(spec, image, rows)
    fix = "encode fewer images per call"
    if spec.spatial_factor:
        fix += " or tile it (model.tiled_encode; python -m engine.sample encode ... --tile 64)"
    _refuse_short("encode()", f"encoding {rows} images of {tuple(image)} at once",
                  {"images": size, "encoder activations": act}, device, fix)


def _refuse_short(what: str, job: str, parts: dict[str, int], device: torch.device, fix: str
                  ) -> None:
    """InputError when the lower bound sum(parts) exceeds what `device` has available."""
    need = sum(parts.values())
    if need < CHECK_FROM_BYTES:
        return
    have = available_bytes(device)
    if have is None or need <= have:
        return
    shown = ", ".join(f"{k} {'>= ' if 'activations' in k else ''}{_gb(v)}"
                      for k, v in parts.items() if v)
    raise InputError(f"{what}: {job} needs at least {_gb(need)} ({shown}) and {device.type} has"
                     f" {_gb(have)} available: {fix}")


def out_of_memory(e: BaseException, what: str, spec: ModelSpec) -> InputError:
    """The InputError for torch's OutOfMemoryError: a batch that passed the lower-bound checks
    above but whose real peak (weights, allocator slack, workspaces) did not fit the device."""
    fix = "encode fewer images per call" if what == "encode()" else \
        "decode fewer rows at a time (batch_size=, --batch-size)"
    if spec.spatial_factor:
        fix += " or tile it (tiled_decode / tiled_encode; --tile 64)"
    return InputError(f"{what}: {describe_out_of_memory(e, fix)}")


def check_spatial_images(spec: ModelSpec, x: Tensor) -> None:
    """Images (B, C, H, W) for a latent-diffusion encoder: H, W multiples of the factor."""
    c, f = spec.output_shape[0], spec.spatial_factor
    if x.dim() != 4 or x.shape[1] != c or not x.is_floating_point():
        raise InputError(f"encode(): expected float images of shape (B, {c}, H, W) in"
                         f" [-1, 1], got {tuple(x.shape)} {dtype_name(x.dtype)}")
    if x.shape[2] % f or x.shape[3] % f or not x.shape[2] or not x.shape[3]:
        raise InputError(f"encode(): image height and width must be positive multiples of"
                         f" {f}, got {tuple(x.shape[2:])}; crop or pad the images")
