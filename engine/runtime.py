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

import importlib
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

DEFAULT_CHUNK = 4096  # sample() batch size when the backend has no upper bound


class SamplerError(RuntimeError):
    """An artifact that cannot be loaded or run: corrupt, mismatched, or backend missing."""


@dataclass(frozen=True)
class ModelSpec:
    """What a decoder artifact takes and gives, read from the artifact's own metadata."""

    family: str
    latent_kind: str  # "gaussian": z ~ N(0, I); "codes": integer codes, uniform in [0, num_codes)
    latent_shape: tuple[int, ...]
    latent_dtype: torch.dtype
    output_shape: tuple[int, ...]
    conditional: bool
    num_classes: int
    num_codes: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    config: dict[str, Any]

    @property
    def extra_inputs(self) -> tuple[str, ...]:
        """Decoder inputs besides the latent and the labels (e.g. a crystal's atom mask)."""
        return self.input_names[1 + self.conditional:]

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str) -> ModelSpec:
        """From the string map of export.manifest.artifact_metadata() (ONNX / .pt2 / sidecar)."""
        if "latent_shape" not in meta:
            raise SamplerError(f"{where} carries no vae-engine metadata (latent_shape, ...);"
                               " re-export it with python -m export.onnx / export.aoti")
        ints = lambda s: tuple(int(v) for v in s.split(",") if v)
        names = lambda s: tuple(v for v in s.split(",") if v)
        return cls(meta.get("family", ""), meta.get("latent_kind", "gaussian"),
                   ints(meta["latent_shape"]), getattr(torch, meta.get("latent_dtype", "float32")),
                   ints(meta["output_shape"]), meta.get("conditional") == "1",
                   int(meta.get("num_classes", 0)), int(meta.get("num_codes", 0)),
                   names(meta["input_names"]), names(meta.get("output_names", "images")),
                   json.loads(meta.get("model_config", "{}")))


@dataclass(frozen=True)
class RuntimeInfo:
    backend: str
    device: str
    precision: str
    min_batch: int
    max_batch: int | None  # None: no upper bound
    latent_kind: str
    latent_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    conditional: bool
    num_classes: int
    artifact: str


# --- backends ------------------------------------------------------------------------------------
class Backend:
    """One loaded graph. Subclasses set `name`, `requires` and implement `run`."""

    name: ClassVar[str] = ""
    requires: ClassVar[str] = ""  # python module the backend needs
    install_hint: ClassVar[str] = ""

    spec: ModelSpec
    device: torch.device
    precision: str = "fp32"
    batch_range: tuple[int, int | None] = (1, None)

    @classmethod
    def installed(cls) -> bool:
        return not cls.requires or importlib.util.find_spec(cls.requires) is not None

    @classmethod
    def require(cls) -> Any:
        try:
            return importlib.import_module(cls.requires)
        except ImportError as e:
            raise SamplerError(f"backend {cls.name!r} is not installed ({e}): {cls.install_hint}"
                               ) from e

    def run(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        raise NotImplementedError

    def run1(self, z: Tensor) -> Tensor:
        """One latent batch in, the first output out (backends may shorten this path)."""
        return self.run((z,))[0]

    def part(self, name: str) -> Backend:
        """Another part (the encoder) of the same export: same format and precision if the
        manifest beside the artifact lists one, else any that runs on this device."""
        from export import manifest

        path = Path(self.path)
        listed = manifest.find(manifest.read(path.parent), name) \
            if (path.parent / "manifest.json").exists() else []
        rank = lambda it: (FORMAT_BACKEND.get(it[1]["format"]) != self.name,
                           it[1].get("precision") != self.precision)
        for file, entry in sorted(listed, key=rank):
            backend = BACKENDS.get(FORMAT_BACKEND.get(entry["format"], ""))
            if backend and backend.installed() and entry.get("device") in ("any", self.device.type):
                return backend(path.parent / file, self.device.type)
        raise SamplerError(f"no {name} artifact for {self.device.type} beside {path} (in"
                           f" {path.parent}/manifest.json); export one: python -m export.onnx CKPT"
                           f" --parts {name} --out {path.parent}")


def _manifest_entry(path: Path) -> dict[str, Any] | None:
    """The entry of `path` in the manifest beside it, if any."""
    from export import manifest

    try:
        return manifest.read(path.parent).get("artifacts", {}).get(path.name)
    except manifest.ManifestError as e:
        raise SamplerError(str(e)) from e


def _verify(path: Path, fix: str) -> dict[str, Any] | None:
    """Size and SHA-256 against the manifest beside the file: truncation is caught early."""
    from engine.checkpoint import sha256

    if not path.is_file():
        raise SamplerError(f"{path} does not exist; {fix}")
    entry = _manifest_entry(path)
    if entry and (path.stat().st_size != entry.get("bytes") or sha256(path) != entry["sha256"]):
        raise SamplerError(f"{path} does not match its manifest entry (size/SHA-256): the file is"
                           f" truncated or modified; {fix}")
    return entry


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime; providers TensorRT > CUDA > CPU, filtered by what is available.

    CPU: `session.run` on numpy views of the tensors (no copies either way).
    CUDA: IOBinding on torch tensors' device pointers, on torch's current stream
    (`user_compute_stream`), outputs allocated by torch; no host round trip.
    """

    name, requires = "onnxruntime", "onnxruntime"
    install_hint = "pip install onnxruntime (CPU) or onnxruntime-gpu (never both)"
    PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

    def __init__(self, path: Path, device: str | None = None, threads: int | None = None) -> None:
        ort = self.require()
        fix = "re-export it with python -m export.onnx CKPT"
        entry = _verify(path, fix)
        self.path, self.precision = path, (entry or {}).get("precision", "fp32")
        providers = self._providers(ort, device)
        opts = ort.SessionOptions()
        if threads:  # ONNX Runtime's own pool; torch's threads are a process-wide setting
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise SamplerError(f"cannot load {path} with ONNX Runtime: not a valid ONNX model"
                               f" (truncated or corrupt?): {str(e).splitlines()[0][:200]}; {fix}"
                               ) from e
        meta = self.session.get_modelmeta().custom_metadata_map
        self.spec = ModelSpec.from_metadata(meta, str(path))
        self.precision = meta.get("precision", self.precision)
        on_gpu = self.session.get_providers()[0] != "CPUExecutionProvider"
        self.device = torch.device("cuda" if on_gpu else "cpu")
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        # The C++ session's run(names, feed, options) skips the Python wrapper's per-call input
        # validation (done once here); public `run` has the same positional signature.
        self._run = getattr(self.session, "_sess", self.session).run
        self._out_names = list(self.output_names)
        self._first = self.input_names[0]
        if on_gpu:
            _np_dtypes()
            self.run1 = lambda z: self._run_cuda((z,))[0]
        self.run = self._run_cuda if on_gpu else self._run_cpu_1 if len(self.input_names) == 1 \
            else self._run_cpu

    def _providers(self, ort: Any, device: str | None) -> list[Any]:
        available = set(ort.get_available_providers())
        wanted = ["CPUExecutionProvider"] if device == "cpu" else \
            [p for p in self.PROVIDERS if p in available]
        gpu_providers = {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & available
        if device == "cuda" and not (gpu_providers and torch.cuda.is_available()):
            raise SamplerError("device='cuda': this onnxruntime has no CUDA provider or no GPU"
                                   " is visible; install onnxruntime-gpu or use device='cpu'")
        if wanted[0] != "CPUExecutionProvider" and not torch.cuda.is_available():
            wanted = ["CPUExecutionProvider"]
        stream = {"user_compute_stream": str(torch.cuda.current_stream().cuda_stream)} \
            if wanted[0] != "CPUExecutionProvider" else {}
        return [(p, stream) if p != "CPUExecutionProvider" else p for p in wanted]

    # CPU: numpy views in, numpy arrays out wrapped by torch.from_numpy: no copies.
    def _run_cpu_1(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        feed = {self._first: inputs[0].detach().numpy()}
        return [torch.from_numpy(o) for o in self._run(self._out_names, feed, None)]

    def _run_cpu(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        feed = {n: t.detach().numpy() for n, t in zip(self.input_names, inputs)}
        return [torch.from_numpy(o) for o in self._run(self._out_names, feed, None)]

    def run1(self, z: Tensor) -> Tensor:
        """The batch-1 hot path (one input, one output, CPU): the least Python there is."""
        return torch.from_numpy(self._run(self._out_names, {self._first: z.numpy()}, None)[0])

    def _run_cuda(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        import numpy as np

        binding = self.session.io_binding()
        dev = self.device.index or 0
        for name, t in zip(self.input_names, inputs):
            t = t.contiguous()
            binding.bind_input(name, "cuda", dev, _NP[t.dtype], list(t.shape), t.data_ptr())
        batch = inputs[0].shape[0]
        outs = []
        for o in self.session.get_outputs():
            shape = (batch, *(int(d) for d in o.shape[1:]))
            dtype = torch.int64 if o.type == "tensor(int64)" else torch.float32
            out = torch.empty(shape, dtype=dtype, device=self.device)
            binding.bind_output(o.name, "cuda", dev, np.dtype(_NP[dtype]), list(shape),
                                out.data_ptr())
            outs.append(out)
        self.session.run_with_iobinding(binding)
        return outs


_NP: dict[torch.dtype, Any] = {}


def _np_dtypes() -> None:
    import numpy as np

    _NP.update({torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
                torch.int32: np.int32})


class AOTInductorBackend(Backend):
    """A `.pt2` AOTInductor package, compiled for one device (its metadata says which)."""

    name, requires = "aoti", "torch"
    install_hint = "AOTInductor comes with torch >= 2.6"

    def __init__(self, path: Path, device: str | None = None) -> None:
        fix = "re-export it with python -m export.aoti CKPT"
        _verify(path, fix)
        try:
            runner = torch._inductor.aoti_load_package(str(path))
        except Exception as e:  # zip / dlopen / schema errors from torch
            raise SamplerError(f"cannot load {path} as an AOTInductor package (truncated or"
                               f" corrupt?): {str(e).splitlines()[0][:200]}; {fix}") from e
        meta = runner.get_metadata()
        self.spec = ModelSpec.from_metadata(meta, str(path))
        built_for = meta.get("device") or meta.get("AOTI_DEVICE_KEY", "cpu")
        if device is not None and torch.device(device).type != built_for:
            raise SamplerError(f"{path} was compiled for {built_for}, not {device}; re-export it"
                               f" with python -m export.aoti CKPT --device {device}")
        if built_for == "cuda" and not torch.cuda.is_available():
            raise SamplerError(f"{path} was compiled for CUDA and no GPU is visible; re-export it"
                               " with python -m export.aoti CKPT --device cpu")
        self.path, self.device = path, torch.device(built_for)
        self.precision = meta.get("precision", "fp32")
        loader = runner.loader
        self._boxed = getattr(loader, "boxed_run", None) or (lambda xs: list(runner(*xs)))

    def run(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        return self._boxed([t.contiguous() for t in inputs])

    def run1(self, z: Tensor) -> Tensor:
        return self._boxed([z.contiguous()])[0]


class EagerBackend(Backend):
    """The PyTorch model of a checkpoint or run directory; `compile=True` wraps torch.compile
    (mode "reduce-overhead", i.e. CUDA graphs, on CUDA)."""

    name, requires = "eager", "torch"

    def __init__(self, path: Path, device: str | None = None, compile: bool = False,
                 part: str = "decoder", loaded: tuple[Any, dict] | None = None) -> None:
        from engine.checkpoint import CheckpointError, load_model
        from export.common import part_specs
        from export.manifest import model_section

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if loaded is None:
            try:
                model, ckpt = load_model(path, device=device)
            except CheckpointError as e:
                raise SamplerError(str(e)) from e
            loaded = (model, ckpt.config["model"])
        model, config = loaded
        parts = {k: _on(p, device) for k, p in model.export_parts().items()}
        if part not in parts:
            raise SamplerError(f"{path}: the model exports no {part!r} part ({sorted(parts)})")
        self.path, self.device, self.compiled, self._loaded = path, torch.device(device), \
            compile, loaded
        inputs, outputs = part_specs(parts["decoder"])
        self.spec = _spec_from_section(model_section(config, inputs, outputs), inputs, outputs)
        module = parts[part].module.eval()
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        self.fn = torch.compile(module, mode=mode) if compile else module
        self.name = "compile" if compile else "eager"

    def run(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        with torch.inference_mode():
            out = self.fn(*inputs)
        return [out] if isinstance(out, Tensor) else list(out)

    def part(self, name: str) -> Backend:
        return EagerBackend(self.path, self.device.type, self.compiled, name, self._loaded)


def _on(part: Any, device: str) -> Any:
    import dataclasses

    return dataclasses.replace(part, example_inputs=tuple(t.to(device)
                                                          for t in part.example_inputs))


def _spec_from_section(section: dict, inputs: list[dict], outputs: list[dict]) -> ModelSpec:
    latent = section["latent"]
    return ModelSpec(section["family"], latent["kind"], tuple(latent["shape"]),
                     getattr(torch, latent["dtype"]), tuple(section["output_shape"]),
                     section["conditional"], section["num_classes"], latent["num_codes"],
                     tuple(s["name"] for s in inputs), tuple(s["name"] for s in outputs),
                     section["config"])


class TensorRTBackend(Backend):
    """A serialized TensorRT engine + JSON sidecar (see export.tensorrt)."""

    name, requires = "tensorrt", "tensorrt"
    install_hint = "pip install tensorrt (from NVIDIA's index) on a machine with an NVIDIA GPU"

    def __init__(self, path: Path, device: str | None = None) -> None:
        from export import tensorrt as trt_export

        if device not in (None, "cuda") and not str(device).startswith("cuda"):
            raise SamplerError(f"TensorRT engines run on CUDA only, not on {device!r}")
        try:
            self.engine = trt_export.TensorRTRunner(path)
        except trt_export.TensorRTError as e:
            raise SamplerError(str(e)) from e
        self.path, self.device = path, torch.device("cuda")
        sidecar = self.engine.sidecar
        self.spec = ModelSpec.from_metadata(sidecar["metadata"], str(path))
        self.precision = sidecar["precision"]
        self.batch_range = self.engine.batch_range
        self.run = self.engine.run


BACKENDS: dict[str, type[Backend]] = {
    "onnxruntime": OnnxRuntimeBackend, "tensorrt": TensorRTBackend, "aoti": AOTInductorBackend,
    "eager": EagerBackend, "compile": EagerBackend,
}
SUFFIX_BACKEND = {".onnx": "onnxruntime", ".engine": "tensorrt", ".plan": "tensorrt",
                  ".pt2": "aoti"}
FORMAT_BACKEND = {"onnx": "onnxruntime", "tensorrt": "tensorrt", "aoti": "aoti"}
# Backends to try for an export directory, fastest first, per device type.
PREFERENCE = {"cuda": ("tensorrt", "aoti", "onnxruntime"), "cpu": ("onnxruntime", "aoti")}


def _choose_from_export_dir(path: Path, backend: str | None, device: str | None
                            ) -> tuple[str, Path]:
    from export import manifest

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
    if p.is_dir() and (p / "manifest.json").exists():
        return _choose_from_export_dir(p, backend, device)
    if p.is_dir():
        if backend not in (None, "eager", "compile"):
            raise SamplerError(f"{p} is a checkpoint/run directory: it runs with the eager backend;"
                               f" for {backend!r} pass an export directory or an artifact file")
        return backend or "eager", p
    kind = SUFFIX_BACKEND.get(p.suffix)
    if kind is None:
        raise SamplerError(f"cannot tell what {p} is: expected a {'/'.join(SUFFIX_BACKEND)} file,"
                           " an export directory with manifest.json, or a checkpoint/run directory")
    if backend is not None and backend != kind:
        raise SamplerError(f"{p.name} is a {kind} artifact, not one for backend {backend!r};"
                           " build the matching artifact (export.onnx / export.aoti /"
                           " export.tensorrt) or drop --backend")
    return kind, p


# --- the sampler ---------------------------------------------------------------------------------
class Sampler:
    """One interface over every backend: `load`, `sample`, `decode`, `encode`, `info`."""

    def __init__(self, backend: Backend, artifact: Path) -> None:
        self._backend, self.artifact = backend, artifact
        self._encoder: Backend | None = None
        spec = backend.spec
        self.spec, self.device = spec, backend.device
        self._run = backend.run
        self._tail = torch.Size(spec.latent_shape)
        self._dtype = spec.latent_dtype
        self._cond = spec.conditional
        # decode() goes straight to run1 when nothing else can be needed: unconditional, one
        # output, no lower/upper batch bound, latents already on the device, no autograd.
        single = len(spec.output_names) == 1 and len(spec.input_names) == 1
        self._direct = single and backend.batch_range == (1, None)
        self._run1 = backend.run1
        self._cpu = self.device.type == "cpu"
        self._gen = torch.Generator(device=self.device)
        self._gen.seed()

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str | None = None,
             device: str | None = None, compile: bool = False,
             threads: int | None = None) -> Sampler:
        """Open an artifact (.onnx / .engine / .plan / .pt2), an export directory (its decoder,
        on the fastest installed backend) or a checkpoint/run directory (PyTorch eager, or
        torch.compile with compile=True). `threads` sizes ONNX Runtime's intra-op pool."""
        if compile and backend not in (None, "eager", "compile"):
            raise SamplerError(f"compile=True applies to the eager backend, not {backend!r}")
        name, artifact = resolve(path, "eager" if backend == "compile" else backend, device)
        cls_ = BACKENDS[name]  # each backend imports its library itself and says if it's missing
        if cls_ is EagerBackend:
            return cls(EagerBackend(artifact, device, compile or backend == "compile"), artifact)
        if cls_ is OnnxRuntimeBackend:
            return cls(cls_(artifact, device, threads), artifact)
        return cls(cls_(artifact, device), artifact)

    @property
    def info(self) -> RuntimeInfo:
        b, s = self._backend, self.spec
        return RuntimeInfo(b.name, str(self.device), b.precision, b.batch_range[0],
                           b.batch_range[1], s.latent_kind, s.latent_shape, s.output_shape,
                           s.conditional, s.num_classes, str(self.artifact))

    # --- decode -------------------------------------------------------------------------------
    def decode(self, z: Tensor, labels: Tensor | None = None, **extra: Tensor
               ) -> Tensor | tuple[Tensor, ...]:
        """z (B, *latent_shape) [+ labels (B,) int] [+ extra inputs by name, e.g. mask=] ->
        outputs (B, *output_shape) on `device` (a tuple when the decoder has several heads).

        Batches larger than the engine's profile are split; smaller ones are padded."""
        if type(z) is not Tensor or z.dtype is not self._dtype or z.shape[1:] != self._tail:
            self._latent_error(z)
        if (self._direct and labels is None and not z.requires_grad
                and (z.is_cpu if self._cpu else z.device == self.device) and z.shape[0]):
            return self._run1(z)  # the hot path: nothing else happens
        return self._call(self._inputs(z.detach().to(self.device), labels, extra))

    def _inputs(self, z: Tensor, labels: Any, extra: dict[str, Any]) -> tuple[Tensor, ...]:
        """The decoder's inputs in graph order, each checked."""
        n, s = z.shape[0], self.spec
        inputs = (z, self._labels(labels, n)) if self._cond or labels is not None else (z,)
        unknown = sorted(set(extra) - set(s.extra_inputs))
        missing = [name for name in s.extra_inputs if name not in extra]
        if unknown or missing:
            raise ValueError(f"this {s.family} decoder takes inputs {list(s.input_names)}: missing"
                             f" {missing}, unexpected {unknown}; pass them by name with batch {n}")
        for name in s.extra_inputs:
            t = torch.as_tensor(extra[name])
            if t.shape[:1] != (n,):
                raise ValueError(f"decode(): input {name!r} must have batch {n} like the latent,"
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
        if n < lo:
            pad = [torch.cat([t, t[:1].expand(lo - n, *t.shape[1:])]) for t in inputs]
            return [o[:n] for o in run(pad)]
        if hi is None or n <= hi:
            return run(inputs)
        chunks = [run([t[i:i + hi] for t in inputs]) for i in range(0, n, hi)]
        return [torch.cat(list(outs)) for outs in zip(*chunks)]

    def _latent_error(self, z: Any) -> None:
        want = f"(B, {', '.join(map(str, self.spec.latent_shape))}) {_dt(self._dtype)}"
        if not isinstance(z, Tensor):
            raise TypeError(f"decode(): expected a torch.Tensor latent of shape {want}, got"
                            f" {type(z).__name__}")
        got = f"{tuple(z.shape)} {_dt(z.dtype)}"
        hint = ""
        if z.dim() == 2 and len(self._tail) == 1 and z.shape[1] == 2 * self._tail[0]:
            hint = ": did you pass the encoder's concatenated (mu, logvar) instead of a sample?"
        elif z.shape[1:] == self._tail:
            hint = f": convert it with z.to(torch.{_dt(self._dtype)})"
        raise ValueError(f"decode(): expected a latent of shape {want}, got {got}{hint}")

    def _labels(self, labels: Any, n: int) -> Tensor:
        s = self.spec
        if not s.conditional:
            raise ValueError(f"this {s.family} model is unconditional; do not pass labels")
        if labels is None:
            raise ValueError(f"this conditional {s.family} model needs labels: pass labels="
                             f" (--labels) an int or an integer tensor of shape ({n},) with"
                             f" values in [0, {s.num_classes})")
        if isinstance(labels, int):
            return torch.full((n,), labels, dtype=torch.int64, device=self.device)
        y = torch.as_tensor(labels)
        if y.shape != (n,) or y.dtype.is_floating_point or y.dtype is torch.bool:
            raise ValueError(f"expected integer labels of shape ({n},), got {tuple(y.shape)}"
                             f" {_dt(y.dtype)}")
        if n and (int(y.min()) < 0 or int(y.max()) >= s.num_classes):
            raise ValueError(f"labels must lie in [0, {s.num_classes}), got values in"
                             f" [{int(y.min())}, {int(y.max())}]")
        return y.to(device=self.device, dtype=torch.int64)

    # --- sample -------------------------------------------------------------------------------
    def latents(self, n: int, seed: int | None = None) -> Tensor:
        """n prior draws on `device`: N(0, I) latents, or uniform codes for the VQ-VAE."""
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
        if n < 1:
            raise ValueError(f"sample(): n must be >= 1, got {n}")
        inputs = self._inputs(self.latents(n, seed), labels, extra)
        bs = self._batch_size(n, batch_size)
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

    def _batch_size(self, n: int, batch_size: int | None) -> int:
        lo, hi = self._backend.batch_range
        if batch_size is None:
            return min(n, hi or DEFAULT_CHUNK)
        if batch_size < 1 or batch_size < lo or (hi is not None and batch_size > hi):
            raise ValueError(f"batch_size {batch_size} is outside the engine's profile [{lo},"
                             f" {hi if hi is not None else 'inf'}]: pick a batch size in range or"
                             " rebuild the engine (python -m export.tensorrt --min-batch/"
                             "--max-batch)")
        return batch_size

    # --- encode -------------------------------------------------------------------------------
    def encode(self, x: Tensor, labels: Any = None) -> Tensor | tuple[Tensor, ...]:
        """images (B, *output_shape) [+ labels] -> (mu, logvar), or codes for the VQ-VAE."""
        shape = torch.Size(self.spec.output_shape)
        if not isinstance(x, Tensor) or x.shape[1:] != shape or not x.is_floating_point():
            got = f"{tuple(x.shape)} {_dt(x.dtype)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"encode(): expected images of shape (B, {', '.join(map(str, shape))})"
                             f" float32, got {got}")
        if self._encoder is None:
            self._encoder = self._backend.part("encoder")
        inputs = (x.to(self.device, torch.float32),)
        if self._cond or labels is not None:
            inputs += (self._labels(labels, x.shape[0]),)
        outs = self._run_batched(self._encoder.run, self._encoder.batch_range, inputs)
        return outs[0] if len(outs) == 1 else tuple(outs)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
