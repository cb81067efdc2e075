"""Runtime backends: one small class per artifact kind (ONNX Runtime, AOTInductor, PyTorch
eager/compiled, TensorRT), each with `run(inputs) -> outputs` on torch tensors, and the tables
that map artifacts to them. `engine.runtime.Sampler` adds the checks, batching and latents."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from engine.checkpoint import CheckpointError, load_model, sha256
from engine.models.latent_diffusion.layouts import LayoutError
from engine.models.latent_diffusion.pretrained import from_pretrained, is_pretrained_path
from engine.models.registry import config_to_dict
from engine.runtime import ort_cpu
from engine.runtime.checks import (
    TensorSig,
    as_int,
    binding_signature,
    check_device,
    check_graph,
    check_part,
    ort_signature,
)
from engine.runtime.ort_cuda import CudaGraphRunner, run_bound, supports_graph_ids
from engine.runtime.types import (  # noqa: F401
    ModelSpec,
    RuntimeInfo,
    SamplerError,
    finite_sum,
    outputs_finite,
    require_finite,
    require_finite_outputs,
)
from export import manifest
from export import tensorrt as trt_export
from export.common import part_specs
from export.manifest import model_section

isfinite, from_numpy = math.isfinite, torch.from_numpy  # bound once for the batch-1 hot path


# ------------------------------------------------------------------------------------
class Backend:
    """One loaded graph. Subclasses set `name`, `requires` and implement `run`."""

    name: ClassVar[str] = ""
    requires: ClassVar[str] = ""  # python module the backend needs
    install_hint: ClassVar[str] = ""

    spec: ModelSpec
    device: torch.device
    precision: str = "fp32"
    batch_range: tuple[int, int | None] = (1, None)
    cuda_graphs: bool = False  # whether runs replay captured CUDA graphs
    graph_rewrites: tuple[str, ...] = ()  # nodes rewritten for this backend at load
    run1_checks_finite: bool = False  # run1 refuses NaN/inf latents itself
    input_sigs: tuple[TensorSig, ...] = ()  # the graph's inputs, for checks of extra inputs

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
        path = Path(self.path)
        listed = manifest.find(manifest.read(path.parent), name) \
            if (path.parent / "manifest.json").exists() else []
        rank = lambda it: (FORMAT_BACKEND.get(it[1]["format"]) != self.name,
                           it[1].get("precision") != self.precision)
        for file, entry in sorted(listed, key=rank):
            backend = BACKENDS.get(FORMAT_BACKEND.get(entry["format"], ""))
            if backend and backend.installed() and entry.get("device") in ("any", self.device.type):
                return backend(path.parent / file, self.device.type, part=name)
        raise SamplerError(f"no {name} artifact for {self.device.type} beside {path} (in"
                           f" {path.parent}/manifest.json); export one: python -m export.onnx CKPT"
                           f" --parts {name} --out {path.parent}")


def _manifest_entry(path: Path) -> dict[str, Any] | None:
    """The entry of `path` in the manifest beside it, if any."""
    try:
        return manifest.read(path.parent).get("artifacts", {}).get(path.name)
    except manifest.ManifestError as e:
        raise SamplerError(str(e)) from e


def _verify(path: Path, fix: str) -> dict[str, Any] | None:
    """Size and SHA-256 against the manifest beside the file: truncation is caught early."""
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
    (`user_compute_stream`), outputs allocated by torch; no host round trip. With the CUDA EP
    first and `cuda_graphs`, each batch shape is captured once as a CUDA graph and replayed
    (engine.runtime.ort_cuda); a model ONNX Runtime cannot capture whole falls back to plain
    IOBinding, and `cuda_graphs` says which one runs.
    """

    name, requires = "onnxruntime", "onnxruntime"
    install_hint = "pip install onnxruntime (CPU) or onnxruntime-gpu (never both)"
    PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

    def __init__(self, path: Path, device: str | None = None, threads: int | None = None,
                 cuda_graphs: bool = True, cpu_rewrites: bool = True, part: str = "decoder"
                 ) -> None:
        ort = self.require()
        fix = "re-export it with python -m export.onnx CKPT"
        entry = _verify(path, fix)
        self.path, self.precision = path, (entry or {}).get("precision", "fp32")
        opts = ort.SessionOptions()
        threads = None if threads is None else as_int(threads, "threads", minimum=1)
        if threads:  # ONNX Runtime's own pool; torch's threads are a process-wide setting
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        providers = self._providers(ort, device)
        self.session = self._session(ort, path, opts, providers, cuda_graphs, cpu_rewrites)
        meta = self.session.get_modelmeta().custom_metadata_map
        check_part(meta, part, str(path))
        self.spec = ModelSpec.from_metadata(meta, str(path))
        self.input_sigs = tuple(ort_signature(self.session.get_inputs()))
        check_graph(self.spec, meta, part, self.input_sigs,
                    ort_signature(self.session.get_outputs()), str(path))
        self.precision = meta.get("precision", self.precision)
        on_gpu = self.session.get_providers()[0] != "CPUExecutionProvider"
        self.device = torch.device("cuda" if on_gpu else "cpu")
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        # The C++ session's run(names, feed, options) skips the Python wrapper's per-call input
        # validation (done once here); public `run` has the same positional signature.
        self._run = getattr(self.session, "_sess", self.session).run
        # One RunOptions for every call: with None, ORT builds a default one per run (~1.3 us
        # of the ~20 us a batch-1 MLP decode takes, measured).
        self._options = ort.RunOptions()
        self._out_names = list(self.output_names)
        self._first = self.input_names[0]
        if on_gpu:
            self.run = self._gpu_runner()
            self.run1 = lambda z: self.run((z,))[0]
        else:
            self.run = self._run_cpu_1 if len(self.input_names) == 1 else self._run_cpu

    def _session(self, ort: Any, path: Path, opts: Any, providers: list[Any],
                 cuda_graphs: bool, cpu_rewrites: bool = True) -> Any:
        """The session; with the CUDA EP first and `cuda_graphs`, try graph capture first; on
        the CPU with `cpu_rewrites`, run the graph rewritten for ONNX Runtime's CPU kernels
        (engine.runtime.ort_cpu), and `graph_rewrites` lists what changed."""
        fix = "re-export it with python -m export.onnx CKPT"
        first = providers[0]
        cuda_graphs = cuda_graphs and supports_graph_ids(ort.__version__)
        if cuda_graphs and isinstance(first, tuple) and first[0] == "CUDAExecutionProvider":
            graphs = [(first[0], {**first[1], "enable_cuda_graph": "1"}), *providers[1:]]
            try:  # refused when some node is not on the CUDA EP: plain IOBinding then
                session = ort.InferenceSession(str(path), opts, providers=graphs)
                self.cuda_graphs = True
                return session
            except Exception:  # onnxruntime raises its own types; the plain load says why
                pass
        if cpu_rewrites and providers == ["CPUExecutionProvider"]:
            model, rewrites = ort_cpu.rewritten_bytes(str(path))
            try:  # a rewritten graph this onnxruntime refuses runs as exported instead
                session = model and ort.InferenceSession(model, opts, providers=providers)
            except Exception as e:  # onnxruntime raises its own types
                warnings.warn(f"{path}: ONNX Runtime refused the CPU-rewritten graph, running it"
                              f" as exported: {str(e).splitlines()[0][:200]}", stacklevel=2)
                session = None
            if session:
                self.graph_rewrites = tuple(rewrites)
                return session
        try:
            return ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise SamplerError(f"cannot load {path} with ONNX Runtime: not a valid ONNX model"
                               f" (truncated or corrupt?): {str(e).splitlines()[0][:200]}; {fix}"
                               ) from e

    def _gpu_runner(self) -> Any:
        if self.cuda_graphs:
            return CudaGraphRunner(self.session, self.input_names)
        return lambda inputs: run_bound(self.session, self.input_names, inputs)

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
        return [torch.from_numpy(o) for o in self._run(self._out_names, feed, self._options)]

    def _run_cpu(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        feed = {n: t.detach().numpy() for n, t in zip(self.input_names, inputs)}
        return [torch.from_numpy(o) for o in self._run(self._out_names, feed, self._options)]

    run1_checks_finite = True  # on the CPU; on CUDA run1 is replaced and checks nothing

    def run1(self, z: Tensor) -> Tensor:
        """The batch-1 hot path (one input, one output, CPU): the least Python there is. The
        float64 sum of the latent is finite iff every element is (~1 us, see finite_sum); a
        non-finite output of a finite latent (|z| so large the decoder overflows) is refused
        too, by the output's float32 sum (~1 us at 784 pixels, see outputs_finite)."""
        a = z.numpy()
        total = finite_sum(a)
        if not isfinite(total):
            require_finite(z, "decode(): the latent", total)
        out = self._run(self._out_names, {self._first: a}, self._options)[0]
        if not outputs_finite(out):
            require_finite_outputs(z, (from_numpy(out),), "decode()")
        return from_numpy(out)


class AOTInductorBackend(Backend):
    """A `.pt2` AOTInductor package, compiled for one device (its metadata says which)."""

    name, requires = "aoti", "torch"
    install_hint = "AOTInductor comes with torch >= 2.6"

    def __init__(self, path: Path, device: str | None = None, part: str = "decoder") -> None:
        fix = "re-export it with python -m export.aoti CKPT"
        _verify(path, fix)
        if not zipfile.is_zipfile(path):  # torch would log a misleading "outdated pt2" first
            raise SamplerError(f"{path} is not an AOTInductor package (a .pt2 is a zip archive;"
                               f" this file is truncated or something else); {fix}")
        try:
            runner = torch._inductor.aoti_load_package(str(path))
        except Exception as e:  # zip / dlopen / schema errors from torch
            raise SamplerError(f"cannot load {path} as an AOTInductor package (truncated or"
                               f" corrupt?): {str(e).splitlines()[0][:200]}; {fix}") from e
        meta = runner.get_metadata()
        check_part(meta, part, str(path))  # its inputs are not exposed cheaply: part only
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


def load_eager(path: Path, device: str, config: str | None = None) -> tuple[Any, dict]:
    """(model, model config dict) of a checkpoint/run directory or of a pretrained
    latent-diffusion VAE (a diffusers folder, a .safetensors file, a TAESD pair)."""
    try:
        if is_pretrained_path(path):
            model = from_pretrained(path, device=device, config=config)
            return model, config_to_dict(model.config)
        if config is not None:
            raise SamplerError(f"config={config!r} applies to pretrained latent-diffusion VAE"
                               f" files; {path} is a checkpoint, whose config is its own")
        model, ckpt = load_model(path, device=device)
    except (CheckpointError, LayoutError) as e:
        raise SamplerError(str(e)) from e
    return model, ckpt.config["model"]


class EagerBackend(Backend):
    """The PyTorch model of a checkpoint or run directory, or of a pretrained latent-diffusion
    VAE (`config` names its preset where the file cannot); `compile=True` wraps torch.compile
    (mode "reduce-overhead", i.e. CUDA graphs, on CUDA)."""

    name, requires = "eager", "torch"

    def __init__(self, path: Path, device: str | None = None, compile: bool = False,
                 part: str = "decoder", loaded: tuple[Any, dict] | None = None,
                 config: str | None = None) -> None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        check_device(device)  # a CUDA device that is not there: one line, not a driver error
        model, config = loaded or load_eager(path, device, config)
        parts = {k: _on(p, device) for k, p in model.export_parts().items()}
        if part not in parts:
            raise SamplerError(f"{path}: the model exports no {part!r} part ({sorted(parts)})")
        self.path, self.device, self.compiled, self._loaded = path, torch.device(device), \
            compile, (model, config)
        self.model = model
        self.precision = _precision(model)
        inputs, outputs = part_specs(parts["decoder"])
        self.input_sigs = tuple((i["name"], tuple(i["shape"]), i["dtype"]) for i in inputs)
        self.spec = _spec_from_section(model_section(config, inputs, outputs), inputs, outputs)
        module = parts[part].module.eval()
        self.cuda_graphs = compile and self.device.type == "cuda"  # reduce-overhead mode
        mode = "reduce-overhead" if self.cuda_graphs else None
        self.fn = torch.compile(module, mode=mode) if compile else module
        self.name = "compile" if compile else "eager"

    def run(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        with torch.inference_mode():
            out = self.fn(*inputs)
        return [out] if isinstance(out, Tensor) else list(out)

    def part(self, name: str) -> Backend:
        return EagerBackend(self.path, self.device.type, self.compiled, name, self._loaded)


def _precision(model: Any) -> str:
    """"fp16"/"bf16" for a half-precision model, else "fp32" (the estimate's itemsize)."""
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def _on(part: Any, device: str) -> Any:
    return dataclasses.replace(part, example_inputs=tuple(t.to(device)
                                                          for t in part.example_inputs))


def _spec_from_section(section: dict, inputs: list[dict], outputs: list[dict]) -> ModelSpec:
    latent, ld = section["latent"], section.get("latent_diffusion")
    extra = (ld["spatial_factor"], ld["prior"], ld["scaling_factor"], ld["shift_factor"]) \
        if ld else ()
    return ModelSpec(section["family"], latent["kind"], tuple(latent["shape"]),
                     getattr(torch, latent["dtype"]), tuple(section["output_shape"]),
                     section["conditional"], section["num_classes"], latent["num_codes"],
                     tuple(s["name"] for s in inputs), tuple(s["name"] for s in outputs),
                     section["config"], *extra)


class TensorRTBackend(Backend):
    """A serialized TensorRT engine + JSON sidecar (see export.tensorrt)."""

    name, requires = "tensorrt", "tensorrt"
    install_hint = "pip install tensorrt (from NVIDIA's index) on a machine with an NVIDIA GPU"

    def __init__(self, path: Path, device: str | None = None, part: str = "decoder") -> None:
        if device not in (None, "cuda") and not str(device).startswith("cuda"):
            raise SamplerError(f"TensorRT engines run on CUDA only, not on {device!r}")
        try:
            self.engine = trt_export.TensorRTRunner(path)
        except trt_export.TensorRTError as e:
            raise SamplerError(str(e)) from e
        self.path, self.device = path, torch.device("cuda")
        sidecar = self.engine.sidecar
        meta = sidecar["metadata"]
        check_part(meta, part, str(path))
        self.spec = ModelSpec.from_metadata(meta, str(path))
        check_graph(self.spec, meta, part, *self._bindings(), str(path))
        self.precision = sidecar["precision"]
        self.batch_range = self.engine.batch_range
        self.run = self.engine.run

    def _bindings(self) -> tuple[list, list]:
        """(inputs, outputs) of the engine as checks.TensorSig: -1 dims are dynamic."""
        r = self.engine
        sig = lambda names: binding_signature(
            names, [tuple(r.engine.get_tensor_shape(n)) for n in names],
            [r._dtypes[n] for n in names])
        return sig(r.input_names), sig(r.output_names)


BACKENDS: dict[str, type[Backend]] = {
    "onnxruntime": OnnxRuntimeBackend, "tensorrt": TensorRTBackend, "aoti": AOTInductorBackend,
    "eager": EagerBackend, "compile": EagerBackend,
}
SUFFIX_BACKEND = {".onnx": "onnxruntime", ".engine": "tensorrt", ".plan": "tensorrt",
                  ".pt2": "aoti"}
FORMAT_BACKEND = {"onnx": "onnxruntime", "tensorrt": "tensorrt", "aoti": "aoti"}
# Backends to try for an export directory, fastest first, per device type.
PREFERENCE = {"cuda": ("tensorrt", "aoti", "onnxruntime"), "cpu": ("onnxruntime", "aoti")}
