"""Load an exported VAE and sample from it, over any backend, through one small interface.

    from engine.runtime import Sampler
    s = Sampler.load("runs/mnist/export")             # export dir: decoder, fastest backend
    s = Sampler.load("runs/mnist/export/decoder.onnx", device="cpu")
    s = Sampler.load("runs/mnist", compile=True)      # checkpoint or run dir: PyTorch (compiled)
    images = s.sample(64, seed=0)                     # (64, 1, 28, 28), latents drawn on s.device
    images = s.decode(z, labels=y)                    # z (B, *latent) [, y (B,) int]
    mu, logvar = s.encode(x)                          # or codes (B, h, w) for the VQ-VAE
    s.info                                            # backend, device, precision, batch range...

The backend follows from the artifact through tables, not a chain of conditions:
SUFFIX_BACKEND (file suffix -> backend), FORMAT_BACKEND (manifest format -> backend) and
PREFERENCE (device -> backends in order, for an export directory). Each backend is a small class
with `run(inputs) -> outputs` on torch tensors; everything else (checks, batching, latents) is
shared in `Sampler`, so the per-call path stays short: for ONNX Runtime at batch 1, decode() is a
shape/dtype check, `tensor.numpy()` (no copy), `session.run` and `torch.from_numpy` (no copy).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.models.latent_diffusion.layouts import LayoutError
from engine.models.latent_diffusion.pretrained import refuse_pickle
from engine.runtime.backends import (
    BACKENDS,
    FORMAT_BACKEND,
    PREFERENCE,
    SUFFIX_BACKEND,
    Backend,
    EagerBackend,
    OnnxRuntimeBackend,
)
from engine.runtime.checks import (
    CHECK_FROM_BYTES,
    SEEDS,
    as_int,
    as_labels,
    check_device,
    check_spatial_images,
    decode_bytes,
    dtype_name,
    extra_input,
    out_of_memory,
    parse_device,
    require_data,
    require_encode_memory,
    require_memory,
)
from engine.runtime.types import (
    InputError,
    RuntimeInfo,
    SamplerError,
    checked_outputs,
    require_finite,
)
from export import manifest

DEFAULT_CHUNK = 4096  # sample() batch size when the backend has no upper bound


def _choose_from_export_dir(path: Path, backend: str | None, device: str | None
                            ) -> tuple[str, Path]:
    try:
        entries = manifest.find(manifest.read(path, missing_ok=False), "decoder")
    except manifest.ManifestError as e:
        raise SamplerError(str(e)) from e
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    order = [backend] if backend else [b for b in PREFERENCE[torch.device(dev).type]
                                       if BACKENDS[b].installed()]
    for name in order:
        for file, entry in sorted(entries, key=lambda it: it[1].get("precision") != "fp32"):
            fits = entry.get("device") in ("any", torch.device(dev).type)
            if FORMAT_BACKEND.get(entry.get("format")) == name and fits:
                return name, path / file
    have = sorted(f"{f} ({e.get('format')}, {e.get('device')})" for f, e in entries)
    raise SamplerError(f"{path}: no decoder artifact for backend(s) {order} on {dev}; the"
                       f" manifest lists {have or 'no decoder'}; export one or pick another"
                       " backend/device")


def resolve(path: str | os.PathLike, backend: str | None, device: str | None
            ) -> tuple[str, Path]:
    """(backend name, artifact path) for a file, an export directory or a checkpoint/run dir."""
    p = Path(path)
    if backend is not None and backend not in BACKENDS:
        raise SamplerError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if (settled := manifest.settled(p)) is not None:  # a crash mid-commit: its complete copy
        return _choose_from_export_dir(settled, backend, device)
    if p.is_dir():
        if backend not in (None, "eager", "compile"):
            raise SamplerError(f"{p} is a checkpoint/run directory: it runs with the eager backend;"
                               f" for {backend!r} pass an export directory or an artifact file")
        return backend or "eager", p
    if p.suffix == ".safetensors":
        return _pretrained_file(p, backend)
    kind = SUFFIX_BACKEND.get(p.suffix)
    if kind is None:
        raise SamplerError(f"cannot tell what {p} is: expected a {'/'.join(SUFFIX_BACKEND)} file,"
                           " an export directory with manifest.json, or a checkpoint/run directory"
                           + _pickle_hint(p))
    if backend is not None and backend != kind:
        raise SamplerError(f"{p.name} is a {kind} artifact, not one for backend {backend!r};"
                           " build the matching artifact (export.onnx / export.aoti /"
                           " export.tensorrt) or drop --backend")
    return kind, p


def _pickle_hint(p: Path) -> str:
    """For a pickle (.ckpt, .bin, .pt, ...): why it is refused and how to convert it."""
    try:
        refuse_pickle(p)
    except LayoutError as e:
        return f"; {e}"
    return ""


def _pretrained_file(p: Path, backend: str | None) -> tuple[str, Path]:
    """A latent-diffusion VAE file (LDM single file, TAESD half): the eager backend."""
    if not p.exists():
        raise SamplerError(f"{p} does not exist")
    if backend not in (None, "eager", "compile"):
        raise SamplerError(f"{p.name} is a weights file: it runs with the eager or compile"
                           f" backend; for {backend!r} export it first (python -m export.onnx"
                           f" {p} / python -m export.aoti {p}) and load the export directory")
    return backend or "eager", p


# --- the sampler ---------------------------------------------------------------------------------
class Sampler:
    """One interface over every backend: `load`, `sample`, `decode`, `encode`, `info`."""

    def __init__(self, backend: Backend, artifact: Path, check_finite: bool = True) -> None:
        self._backend, self.artifact = backend, artifact
        self._encoder: Backend | None = None
        spec = backend.spec
        self.spec, self.device = spec, backend.device
        self._run = backend.run
        self._tail = torch.Size(spec.latent_shape)
        self._dtype = spec.latent_dtype
        self._cond = spec.conditional
        self._spatial = spec.spatial_factor  # > 0: latent height and width are dynamic
        # decode() goes straight to run1 when nothing else can be needed: unconditional, one
        # output, no lower/upper batch bound, latents already on the device, no autograd.
        single = len(spec.output_names) == 1 and len(spec.input_names) == 1
        self._direct = single and backend.batch_range == (1, None)
        self._run1 = backend.run1
        self._cpu = self.device.type == "cpu"
        # NaN/inf inputs and outputs are refused: on the CPU both (ONNX Runtime's CPU backend
        # checks inside run1, on its numpy view); on a GPU the outputs alone, at one device sync
        # per call, unless the caller opted out (check_finite=False).
        self._check_direct = self._cpu and not backend.run1_checks_finite
        self._check_gpu = check_finite and not self._cpu
        self._check_run1 = self._check_direct or self._check_gpu  # outputs of the hot path
        # Activations are counted in the backend's precision; batches of more rows than this
        # leave the hot path for the memory check (checks.require_memory).
        self._itemsize = 2 if backend.precision in ("fp16", "bf16") else 4
        row = sum(decode_bytes(spec, spec.latent_shape, 1, self._itemsize))
        self._rows_unchecked = max(1, CHECK_FROM_BYTES // max(row, 1))
        self._gen = torch.Generator(device=self.device)
        self._gen.seed()

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str | None = None,
             device: str | None = None, compile: bool = False,
             threads: int | None = None, cuda_graphs: bool = True,
             cpu_rewrites: bool = True, config: str | None = None, check_finite: bool = True
             ) -> Sampler:
        """Open an artifact (.onnx / .engine / .plan / .pt2), an export directory (its decoder,
        on the fastest installed backend) or a checkpoint/run directory (PyTorch eager, or
        torch.compile with compile=True). `threads` sizes ONNX Runtime's intra-op pool;
        `cuda_graphs` lets ONNX Runtime's CUDA EP capture and replay CUDA graphs;
        `cpu_rewrites` lets its CPU backend run exact, faster forms of some convolutions
        (engine.runtime.ort_cpu; `info.graph_rewrites` lists them). A pretrained
        latent-diffusion VAE (a diffusers folder, a .safetensors file, a TAESD pair) runs on the
        eager backend; `config` names its preset where the file cannot (sd15, sdxl, sd3, flux).
        On a GPU, `check_finite=False` skips the check that outputs hold no NaN/inf (one device
        sync per decode/encode call, docs/reliability.md); the CPU always checks.
        """
        if compile and backend not in (None, "eager", "compile"):
            raise SamplerError(f"compile=True applies to the eager backend, not {backend!r}")
        parse_device(device)  # a typo is one line; backends say when a GPU is missing,
        if torch.cuda.is_available():  # and this, when a GPU index is not here
            check_device(device)
        name, artifact = resolve(path, "eager" if backend == "compile" else backend, device)
        cls_ = BACKENDS[name]  # each backend imports its library itself and says if it's missing
        if cls_ is EagerBackend:
            return cls(EagerBackend(artifact, device, compile or backend == "compile",
                                    config=config), artifact, check_finite)
        if config is not None:
            raise SamplerError(f"config={config!r} applies to pretrained VAE files; {artifact}"
                               " carries its own config")
        if cls_ is OnnxRuntimeBackend:
            return cls(cls_(artifact, device, threads, cuda_graphs, cpu_rewrites), artifact,
                       check_finite)
        return cls(cls_(artifact, device), artifact, check_finite)

    @property
    def backend(self) -> Backend:
        """The loaded backend (e.g. `.session`, the ort.InferenceSession, for ONNX Runtime)."""
        return self._backend

    @property
    def info(self) -> RuntimeInfo:
        b, s = self._backend, self.spec
        return RuntimeInfo(b.name, str(self.device), b.precision, b.batch_range[0],
                           b.batch_range[1], s.latent_kind, s.latent_shape, s.output_shape,
                           s.conditional, s.num_classes, str(self.artifact), b.cuda_graphs,
                           b.graph_rewrites)

    # --- decode -------------------------------------------------------------------------------
    def decode(self, z: Tensor, labels: Tensor | None = None, **extra: Tensor
               ) -> Tensor | tuple[Tensor, ...]:
        """z (B, *latent_shape) [+ labels (B,) int] [+ extra inputs by name, e.g. mask=] ->
        outputs (B, *output_shape) on `device` (a tuple when the decoder has several heads).

        Batches larger than the engine's profile are split; smaller ones are padded; a batch
        of 0 rows gives outputs of 0 rows. Bad inputs raise InputError: a latent of another
        shape/dtype, on the meta device, holding NaN/inf, or so large that the outputs are not
        finite (on a GPU: unless loaded with check_finite=False), or a batch whose outputs and
        activations cannot fit in the device's memory."""
        try:
            if type(z) is not Tensor or z.dtype is not self._dtype or z.shape[1:] != self._tail:
                self._check_latent(z)
            if (self._direct and labels is None and not extra and not z.requires_grad
                    and (z.is_cpu if self._cpu else z.device == self.device)
                    and 0 < z.shape[0] <= self._rows_unchecked):
                if self._check_run1:
                    if self._check_direct:
                        require_finite(z, "decode(): the latent")
                    return checked_outputs(z, [self._run1(z)], "decode()")[0]
                return self._run1(z)  # the hot path: nothing else happens
            require_data(z, "decode(): the latent")
            hi = self._backend.batch_range[1]
            require_memory(self.spec, z.shape[1:], max(1, min(z.shape[0], hi or z.shape[0])),
                           self.device, "decode()", self._itemsize, out_rows=z.shape[0])
            inputs = self._inputs(z.detach().to(self.device), labels, extra)
            if self._cpu:
                require_finite(inputs[0], "decode(): the latent")
            outs = self._run_batched(self._run, self._backend.batch_range, inputs)
            outs = checked_outputs(inputs[0], outs, "decode()", self._check_gpu)
            return outs[0] if len(outs) == 1 else tuple(outs)
        except torch.OutOfMemoryError as e:
            raise out_of_memory(e, "decode()", self.spec) from None

    def _inputs(self, z: Tensor, labels: Any, extra: dict[str, Any]) -> tuple[Tensor, ...]:
        """The decoder's inputs in graph order, each checked."""
        n, s = z.shape[0], self.spec
        inputs = (z, self._labels(labels, n)) if self._cond or labels is not None else (z,)
        unknown = sorted(set(extra) - set(s.extra_inputs))
        missing = [name for name in s.extra_inputs if name not in extra]
        if unknown or missing:
            raise InputError(f"this {s.family} decoder takes inputs {list(s.input_names)}: missing"
                             f" {missing}, unexpected {unknown}; pass them by name with batch {n}")
        for name in s.extra_inputs:
            t = extra_input(name, extra[name], z, self._backend.input_sigs)
            if t.shape[:1] != (n,):
                raise InputError(f"decode(): input {name!r} must have batch {n} like the latent,"
                                 f" got shape {tuple(t.shape)}")
            inputs += (t.to(self.device),)
        return inputs

    def _call(self, inputs: tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
        outs = self._run_batched(self._run, self._backend.batch_range, inputs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    @staticmethod
    def _run_batched(run: Any, batch_range: tuple[int, int | None],
                     inputs: tuple[Tensor, ...]) -> list[Tensor]:
        """Split batches above the profile's max, pad those below its min (rows independent)."""
        lo, hi = batch_range
        n = inputs[0].shape[0]
        if n == 0:  # no rows: one zero row gives each output's shape and dtype, then 0 rows
            one = [torch.zeros((1, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in inputs]
            return [o[:0] for o in Sampler._run_batched(run, batch_range, one)]
        if n < lo:
            pad = [torch.cat([t, t[:1].expand(lo - n, *t.shape[1:])]) for t in inputs]
            return [o[:n] for o in run(pad)]
        if hi is None or n <= hi:
            return run(inputs)
        chunks = [run([t[i:i + hi] for t in inputs]) for i in range(0, n, hi)]
        return [torch.cat(list(outs)) for outs in zip(*chunks)]

    def _check_latent(self, z: Any) -> None:
        """The latent check off the fast path: a latent-diffusion latent (B, C, h, w) of any
        h, w passes; anything else that is not exactly the expected shape raises."""
        if not (self._spatial and type(z) is Tensor and z.dtype is self._dtype and z.dim() == 4
                and z.shape[1] == self._tail[0] and z.shape[2] and z.shape[3]):
            self._latent_error(z)
        require_memory(self.spec, z.shape[1:], max(1, z.shape[0]), self.device, "decode()",
                       self._itemsize)

    def _latent_error(self, z: Any) -> None:
        want = f"(B, {', '.join(map(str, self.spec.latent_shape))}) {_dt(self._dtype)}"
        if self._spatial:
            want = f"(B, {self._tail[0]}, h, w) {_dt(self._dtype)}"
        if not isinstance(z, Tensor):
            raise InputError(f"decode(): expected a torch.Tensor latent of shape {want}, got"
                            f" {type(z).__name__}")
        got = f"{tuple(z.shape)} {_dt(z.dtype)}"
        hint = ""
        if z.dim() == 2 and len(self._tail) == 1 and z.shape[1] == 2 * self._tail[0]:
            hint = ": did you pass the encoder's concatenated (mu, logvar) instead of a sample?"
        elif z.shape[1:] == self._tail:
            hint = f": convert it with z.to(torch.{_dt(self._dtype)})"
        raise InputError(f"decode(): expected a latent of shape {want}, got {got}{hint}")

    def _labels(self, labels: Any, n: int) -> Tensor:
        """(n,) int64 labels from an integer (any kind: every row) or n integers in range."""
        s = self.spec
        if not s.conditional:
            raise InputError(f"this {s.family} model is unconditional; do not pass labels")
        if labels is None:
            raise InputError(f"this conditional {s.family} model needs labels: pass labels="
                             f" (--labels) an int or an integer tensor of shape ({n},) with"
                             f" values in [0, {s.num_classes})")
        return as_labels(labels, n, s.num_classes).to(self.device)

    # --- sample -------------------------------------------------------------------------------
    def latents(self, n: int, seed: int | None = None) -> Tensor:
        """n prior draws on `device`: N(0, I) latents, or uniform codes for the VQ-VAE."""
        if not self.spec.has_prior:
            raise SamplerError(
                f"this {self.spec.family} VAE has no prior to sample from: its latents come from"
                " a diffusion model (N(0, I) draws decode to noise); decode latents with"
                " decode(z) (python -m engine.sample decode LATENTS --vae ...)")
        n = as_int(n, "n (the number of samples)", minimum=0)
        seed = None if seed is None else as_int(seed, "seed", valid=SEEDS)
        gen = self._gen if seed is None else torch.Generator(self.device).manual_seed(seed)
        shape = (n, *self.spec.latent_shape)
        if self.spec.latent_kind == "codes":
            return torch.randint(self.spec.num_codes, shape, generator=gen, device=self.device)
        return torch.randn(shape, generator=gen, device=self.device, dtype=self._dtype)

    def sample(self, n: int, batch_size: int | None = None, seed: int | None = None,
               labels: Any = None, **extra: Tensor) -> Tensor | tuple[Tensor, ...]:
        """n samples (n, *output_shape). All latents are drawn first, so a seed gives the same
        samples whatever the batch size; decoding runs in batches of `batch_size` (default: the
        engine's max, or DEFAULT_CHUNK) written into outputs allocated once for all n.
        `extra` holds the decoder's other inputs for all n rows (e.g. mask= for crystals)."""
        try:
            n = as_int(n, "sample(): n", minimum=1)
            bs = self._batch_size(n, batch_size)
            require_memory(self.spec, self.spec.latent_shape, bs, self.device, "sample()",
                           self._itemsize, out_rows=n)
            inputs = self._inputs(self.latents(n, seed), labels, extra)
            if n <= bs:
                return self._call(inputs)
            outs: list[Tensor] = []
            for i in range(0, n, bs):
                part = self._run_batched(self._run, self._backend.batch_range,
                                         tuple(t[i:i + bs] for t in inputs))
                if not outs:  # one allocation per output for all n
                    outs = [torch.empty((n, *o.shape[1:]), dtype=o.dtype, device=o.device)
                            for o in part]
                for out, o in zip(outs, part):
                    out[i:i + o.shape[0]] = o
            return outs[0] if len(outs) == 1 else tuple(outs)
        except torch.OutOfMemoryError as e:
            raise out_of_memory(e, "sample()", self.spec) from None

    def _batch_size(self, n: int, batch_size: int | None) -> int:
        lo, hi = self._backend.batch_range
        if batch_size is None:
            return min(n, hi or DEFAULT_CHUNK)
        batch_size = as_int(batch_size, "batch_size")
        if batch_size < 1 or batch_size < lo or (hi is not None and batch_size > hi):
            raise InputError(f"batch_size {batch_size} is outside the engine's profile [{lo},"
                             f" {hi if hi is not None else 'inf'}]: pick a batch size in range or"
                             " rebuild the engine (python -m export.tensorrt --min-batch/"
                             "--max-batch)")
        return batch_size

    # --- encode -------------------------------------------------------------------------------
    def encode(self, x: Tensor, labels: Any = None) -> Tensor | tuple[Tensor, ...]:
        """images (B, *output_shape) [+ labels] -> (mu, logvar), or codes for the VQ-VAE.
        Float images of any precision are converted to float32; 0 rows give 0 rows. Bad inputs
        raise InputError, as in decode()."""
        try:
            shape = torch.Size(self.spec.output_shape)
            if self._spatial and isinstance(x, Tensor):
                check_spatial_images(self.spec, x)
            elif not isinstance(x, Tensor) or x.shape[1:] != shape or not x.is_floating_point():
                got = f"{tuple(x.shape)} {_dt(x.dtype)}" if isinstance(x, Tensor) else \
                    type(x).__name__
                raise InputError(f"encode(): expected images of shape (B,"
                                 f" {', '.join(map(str, shape))}) float32, got {got}")
            require_data(x, "encode(): the images")
            require_encode_memory(self.spec, x.shape[1:], x.shape[0], self.device)
            if self._encoder is None:
                self._encoder = self._backend.part("encoder")
            inputs = (x.to(self.device, torch.float32),)
            if self._cpu:
                require_finite(inputs[0], "encode(): the images")
            if self._cond or labels is not None:
                inputs += (self._labels(labels, x.shape[0]),)
            outs = self._run_batched(self._encoder.run, self._encoder.batch_range, inputs)
            outs = checked_outputs(inputs[0], outs, "encode()", self._check_gpu, "x")
            return outs[0] if len(outs) == 1 else tuple(outs)
        except torch.OutOfMemoryError as e:
            raise out_of_memory(e, "encode()", self.spec) from None


def _dt(dtype: torch.dtype) -> str:
    return dtype_name(dtype)
