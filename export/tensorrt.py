"""TensorRT 10 engines from the exported ONNX graphs, and a thin runner for them.

    python -m export.tensorrt runs/mnist/export/decoder.onnx --fp16
    python -m export.tensorrt decoder.onnx --min-batch 1 --opt-batch 64 --max-batch 4096
    python -m export.tensorrt decoder.onnx --profiles 1:1:16,16:256:4096 --timing-cache tc.bin

Writes `<onnx stem>[.fp16|.bf16].engine` beside the ONNX file (or --out) and a JSON sidecar
`<engine>.json`: TensorRT version, GPU name and compute capability, precision, the optimization
profiles, the ONNX file's metadata (latent/output shapes, input names, ...) and the engine's
SHA-256. The runner refuses an engine whose sidecar names another TensorRT version or compute
capability: serialized engines are tied to both.

The build (parse, config, profiles, timing cache, build) checks each TensorRT boolean, naming the
tensor. The runner uses the TensorRT 10 named-tensor API (set_input_shape / set_tensor_address
on torch data_ptr(), execute_async_v3 on torch's current stream). `tensorrt` is imported lazily;
without it (or a GPU) the commands fail with one clear line. Verified here: profile planning,
sidecar validation, the commit and the missing-TensorRT / GPU errors (tests/export/
test_tensorrt.py). Written against TensorRT 10 but never run: no machine here has TensorRT.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from engine import checkpoint
from engine.checkpoint import atomic_write_bytes, atomic_write_json, fsync_dir, sha256
from export import manifest
from export.common import PARITY_BATCHES, ExportError, check_parity
from export.onnx import ort_runner

SIDECAR_FORMAT = 1
PRECISIONS = ("fp32", "fp16", "bf16")


class TensorRTError(RuntimeError):
    """TensorRT missing, a failed build step, or an engine that does not fit this machine."""


# --- pure parts: profiles and sidecars (tested without TensorRT) ---------------------------------
def parse_profiles(text: str | None, min_batch: int = 1, opt_batch: int = 64,
                   max_batch: int = 4096) -> list[tuple[int, int, int]]:
    """'1:1:16,16:256:4096' -> [(1, 1, 16), (16, 256, 4096)]; else one (min, opt, max)."""
    if text:
        try:
            triples = [tuple(int(v) for v in item.split(":")) for item in text.split(",")]
        except ValueError as e:
            raise ValueError(f"--profiles {text!r}: expected MIN:OPT:MAX[,MIN:OPT:MAX...]") from e
    else:
        triples = [(min_batch, opt_batch, max_batch)]
    for t in triples:
        if len(t) != 3 or not 1 <= t[0] <= t[1] <= t[2]:
            raise ValueError(f"batch profile {':'.join(map(str, t))}: expected MIN:OPT:MAX"
                             " with 1 <= MIN <= OPT <= MAX")
    return triples  # type: ignore[return-value]


def plan_profiles(inputs: list[tuple[str, list[int]]], batches: list[tuple[int, int, int]]
                  ) -> list[dict[str, dict[str, list[int]]]]:
    """Shapes per profile and input: the batch axis (0) varies, every other axis is fixed.

    inputs: (name, shape) with -1 (or a string) for the dynamic batch axis."""
    profiles = []
    for lo, opt, hi in batches:
        profile = {}
        for name, shape in inputs:
            rest = [int(d) for d in shape[1:]]
            if any(d < 1 for d in rest):
                raise ValueError(f"input {name!r} has dynamic non-batch axes {shape}; only the"
                                 " batch axis (0) may be dynamic")
            profile[name] = {"min": [lo, *rest], "opt": [opt, *rest], "max": [hi, *rest]}
        profiles.append(profile)
    return profiles


def batch_range(profiles: list[dict[str, dict[str, list[int]]]]) -> tuple[int, int]:
    first = [next(iter(p.values())) for p in profiles]
    return min(s["min"][0] for s in first), max(s["max"][0] for s in first)


def sidecar_path(engine: Path) -> Path:
    return engine.with_name(engine.name + ".json")


def read_sidecar(engine: Path) -> dict[str, Any]:
    path = sidecar_path(engine)
    fix = f"rebuild it: python -m export.tensorrt MODEL.onnx --out {engine}"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise TensorRTError(f"{engine}: sidecar {path.name} is missing; {fix}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TensorRTError(f"{path} is not valid JSON (truncated or corrupt); {fix}") from e
    required = ("format", "tensorrt", "compute_capability", "gpu", "precision", "profiles",
                "metadata", "engine_sha256", "bytes")
    missing = [k for k in required if k not in data] if isinstance(data, dict) else required
    if missing or data.get("format") != SIDECAR_FORMAT:
        raise TensorRTError(f"{path}: expected sidecar format {SIDECAR_FORMAT} with keys"
                            f" {list(required)}; missing {missing}; {fix}")
    return data


def validate_sidecar(sidecar: dict[str, Any], trt_version: str, gpu_name: str,
                     compute_capability: str, where: str = "engine") -> list[str]:
    """Raise when the engine cannot run here; return warnings (same capability, other GPU)."""
    fix = "rebuild the engine on this machine: python -m export.tensorrt MODEL.onnx"
    if sidecar["tensorrt"] != trt_version:
        raise TensorRTError(f"{where} was built with TensorRT {sidecar['tensorrt']}, this is"
                            f" TensorRT {trt_version}; serialized engines only load in the"
                            f" version that built them; {fix}")
    if sidecar["compute_capability"] != compute_capability:
        raise TensorRTError(f"{where} was built for compute capability"
                            f" {sidecar['compute_capability']} ({sidecar['gpu']}), this GPU is"
                            f" {compute_capability} ({gpu_name}); {fix}")
    if sidecar["gpu"] != gpu_name:
        return [f"{where} was built on {sidecar['gpu']}, running on {gpu_name} (same compute"
                " capability: it loads, but its tactics were timed on the other GPU)"]
    return []


# --- environment ---------------------------------------------------------------------------------
def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTError("TensorRT is not installed: pip install tensorrt (from NVIDIA's"
                            " index) on a machine with an NVIDIA GPU, or use the onnxruntime /"
                            " aoti backends") from e
    if not trt.__version__.startswith("10."):
        raise TensorRTError(f"TensorRT {trt.__version__} found; this code uses the TensorRT 10"
                            " API (named tensors, execute_async_v3): install tensorrt 10.x")
    return trt


def gpu_identity() -> tuple[str, str]:
    if not torch.cuda.is_available():
        raise TensorRTError("TensorRT needs an NVIDIA GPU and none is visible"
                            " (torch.cuda.is_available() is False)")
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def _check(ok: Any, what: str) -> None:
    """TensorRT reports many failures as a False/None return: turn them into errors."""
    if ok is False or ok is None:
        raise TensorRTError(f"TensorRT: {what} failed")


# --- building ------------------------------------------------------------------------------------
def _parse(trt: Any, builder: Any, onnx_path: Path) -> tuple[Any, Any]:
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, _logger(trt))
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT could not parse {onnx_path}: {errors}")
    return network, parser


def _config(trt: Any, builder: Any, precision: str, workspace_gb: float) -> Any:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        if not hasattr(trt.BuilderFlag, "BF16"):
            raise TensorRTError(f"TensorRT {trt.__version__} has no BF16 builder flag")
        config.set_flag(trt.BuilderFlag.BF16)
    return config


def _add_profiles(builder: Any, config: Any, profiles: list[dict]) -> None:
    for i, profile in enumerate(profiles):
        p = builder.create_optimization_profile()
        for name, s in profile.items():
            _check(p.set_shape(name, s["min"], s["opt"], s["max"]) is not False,
                   f"profile {i}: set_shape({name!r}, min={s['min']}, opt={s['opt']},"
                   f" max={s['max']})")
        if config.add_optimization_profile(p) < 0:
            raise TensorRTError(f"TensorRT: add_optimization_profile({i}) failed for inputs"
                                f" {sorted(profile)}")


@contextlib.contextmanager
def _timing_cache(config: Any, path: Path | None):
    """Load a timing cache (a corrupt or mismatched one is ignored with a warning), and write
    the updated cache back atomically after a successful build."""
    if path is None:
        yield
        return
    data = path.read_bytes() if path.exists() else b""
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, False):
        print(f"warning: timing cache {path} does not fit this TensorRT/GPU; starting a fresh one",
              file=sys.stderr)
        cache = config.create_timing_cache(b"")
        _check(config.set_timing_cache(cache, False), "set_timing_cache(fresh cache)")
    yield
    atomic_write_bytes(path, bytes(memoryview(config.get_timing_cache().serialize())))


_LOGGER: Any = None


def _logger(trt: Any) -> Any:
    global _LOGGER  # one logger per process: TensorRT expects it to outlive its objects
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def onnx_inputs(onnx_path: Path) -> tuple[list[tuple[str, list]], dict[str, str]]:
    """(name, shape) of the graph inputs (dynamic axes as -1) and the metadata_props."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inputs = [(i.name, [d.dim_value if d.HasField("dim_value") else -1
                        for d in i.type.tensor_type.shape.dim]) for i in model.graph.input]
    return inputs, {p.key: p.value for p in model.metadata_props}


def build_engine(onnx_path: Path, out: Path | None = None, precision: str = "fp32",
                 batches: list[tuple[int, int, int]] | None = None, workspace_gb: float = 4.0,
                 timing_cache: Path | None = None) -> Path:
    """Build, serialize, check and describe an engine; returns its path."""
    onnx_path = Path(onnx_path)
    inputs, metadata = onnx_inputs(onnx_path)
    profiles = plan_profiles(inputs, batches or parse_profiles(None))
    suffix = "" if precision == "fp32" else f".{precision}"
    out = Path(out) if out else onnx_path.with_name(f"{onnx_path.stem}{suffix}.engine")
    trt = import_tensorrt()
    gpu, capability = gpu_identity()
    builder = trt.Builder(_logger(trt))
    network, _parser = _parse(trt, builder, onnx_path)
    config = _config(trt, builder, precision, workspace_gb)
    _add_profiles(builder, config, profiles)
    with _timing_cache(config, timing_cache):
        serialized = builder.build_serialized_network(network, config)
        _check(serialized, f"build_serialized_network({onnx_path.name}, {precision})")
    data = bytes(memoryview(serialized))
    sidecar = {
        "format": SIDECAR_FORMAT, "engine": out.name, "onnx": onnx_path.name,
        "onnx_sha256": sha256(onnx_path), "engine_sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data), "tensorrt": trt.__version__, "gpu": gpu,
        "compute_capability": capability, "precision": precision, "profiles": profiles,
        "batch_range": list(batch_range(profiles)), "workspace_gb": workspace_gb,
        "metadata": {**metadata, "precision": precision}}
    return publish(data, sidecar, out, onnx_path, precision)


def publish(data: bytes, sidecar: dict[str, Any], out: Path, onnx_path: Path,
            precision: str) -> Path:
    """Write engine + sidecar in a staging folder, check parity there, then move both in: into
    the export directory with its manifest entry at once (manifest.commit) when the ONNX file
    is listed in a manifest beside `out`, else each by rename (a kill between the two leaves a
    pair whose SHA-256 disagree, which the runner refuses). A failed check moves nothing."""
    listed = _in_export_dir(out, onnx_path)
    # outside an export directory: a staging folder beside the engine, nothing else checked
    with manifest.staging(out.parent if listed else out, check=listed) as stage:
        engine = stage / out.name
        atomic_write_bytes(engine, data)
        atomic_write_json(sidecar_path(engine), sidecar)
        parity = _check_engine(engine, onnx_path, precision)
        files = {out.name: (engine, None), sidecar_path(out).name: (sidecar_path(engine), None)}
        if listed:
            entry = _manifest_entry(engine, onnx_path, precision, parity)
            manifest.commit(out.parent, None, {**files, out.name: (engine, entry)})
        else:
            for name, (staged, _) in files.items():
                os.replace(staged, out.parent / name)
            fsync_dir(out.parent)
    return out


def _in_export_dir(out: Path, onnx_path: Path) -> bool:
    listed = manifest.read(out.parent).get("artifacts", {}).get(onnx_path.name)
    return listed is not None and out.parent == onnx_path.parent


def _check_engine(engine: Path, onnx_path: Path, precision: str) -> dict[str, Any]:
    """Parity of the engine against ONNX Runtime (CPU) on the same ONNX file, at the usual
    batch sizes clipped to the engine's range; recorded in the sidecar beside the engine."""
    runner = TensorRTRunner(engine)
    lo, hi = runner.batch_range
    batches = sorted({min(max(b, lo), hi) for b in PARITY_BATCHES})
    inputs, metadata = onnx_inputs(onnx_path)
    config = json.loads(metadata.get("model_config", "{}"))
    dtypes = {n: runner._dtypes[n] for n, _ in inputs}
    examples = [torch.zeros([1 if d < 1 else d for d in shape], dtype=dtypes[n])
                for n, shape in inputs]
    parity = check_parity(engine.name, ort_runner(onnx_path),
                          lambda *xs: [o.cpu() for o in runner.run([x.cuda() for x in xs])],
                          [n for n, _ in inputs], examples, config, precision, batches)
    atomic_write_json(sidecar_path(engine), {**runner.sidecar, "parity": parity})
    return parity


def _manifest_entry(engine: Path, onnx_path: Path, precision: str,
                    parity: dict[str, Any]) -> dict[str, Any]:
    """The engine's manifest entry: its ONNX file's, with what the engine changes."""
    listed = manifest.read(onnx_path.parent)["artifacts"][onnx_path.name]
    sidecar = read_sidecar(engine)
    return {**listed, "format": "tensorrt", "file": engine.name, "sha256": sha256(engine),
            "bytes": engine.stat().st_size, "precision": precision, "device": "cuda",
            "batch_range": list(batch_range(sidecar["profiles"])), "parity": parity,
            "settings": {"tensorrt": sidecar["tensorrt"], "gpu": sidecar["gpu"],
                         "compute_capability": sidecar["compute_capability"],
                         "profiles": sidecar["profiles"], "onnx": onnx_path.name}}


# --- running -------------------------------------------------------------------------------------
class TensorRTRunner:
    """A deserialized engine and one execution context; `run(inputs)` on torch CUDA tensors."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.sidecar = read_sidecar(self.path)
        fix = f"rebuild it: python -m export.tensorrt {self.sidecar.get('onnx', 'MODEL.onnx')}"
        if not self.path.is_file():
            raise TensorRTError(f"{self.path} does not exist; {fix}")
        if (self.path.stat().st_size != self.sidecar["bytes"]
                or sha256(self.path) != self.sidecar["engine_sha256"]):
            raise TensorRTError(f"{self.path} does not match its sidecar (size/SHA-256): the"
                                f" engine is truncated or modified; {fix}")
        trt = import_tensorrt()
        gpu, capability = gpu_identity()
        for w in validate_sidecar(self.sidecar, trt.__version__, gpu, capability, self.path.name):
            print(f"warning: {w}", file=sys.stderr)
        self._runtime = trt.Runtime(_logger(trt))
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        _check(self.engine, f"deserialize_cuda_engine({self.path.name}) ({fix})")
        self.context = self.engine.create_execution_context()
        _check(self.context, "create_execution_context()")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = lambda n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if is_in(n)]
        self.output_names = [n for n in names if not is_in(n)]
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                  trt.int64: torch.int64, trt.bool: torch.bool}
        self._dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        self.profiles = [(p[next(iter(p))]["min"][0], p[next(iter(p))]["max"][0])
                         for p in self.sidecar["profiles"]]
        self.batch_range = batch_range(self.sidecar["profiles"])
        self._active = 0

    def _select_profile(self, batch: int, stream: int) -> None:
        for i, (lo, hi) in enumerate(self.profiles):
            if lo <= batch <= hi:
                if i != self._active:
                    _check(self.context.set_optimization_profile_async(i, stream),
                           f"set_optimization_profile_async({i}) for batch {batch}")
                    self._active = i
                return
        raise TensorRTError(f"batch {batch} is outside every profile {self.profiles} of"
                            f" {self.path.name}; split the batch or rebuild with --max-batch")

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        stream = torch.cuda.current_stream().cuda_stream
        self._select_profile(inputs[0].shape[0], stream)
        keep = []
        for name, t in zip(self.input_names, inputs):
            t = t.to(device="cuda", dtype=self._dtypes[name]).contiguous()
            keep.append(t)
            _check(self.context.set_input_shape(name, tuple(t.shape)),
                   f"set_input_shape({name!r}, {tuple(t.shape)})")
            _check(self.context.set_tensor_address(name, t.data_ptr()),
                   f"set_tensor_address({name!r})")
        outs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self._dtypes[name], device="cuda")
            _check(self.context.set_tensor_address(name, out.data_ptr()),
                   f"set_tensor_address({name!r})")
            outs.append(out)
        _check(self.context.execute_async_v3(stream), f"execute_async_v3({self.path.name})")
        return outs


# --- command line --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.tensorrt",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("onnx", help="an ONNX file written by python -m export.onnx")
    ap.add_argument("--out", default=None, help="engine path (default <onnx stem>.engine)")
    prec = ap.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true")
    prec.add_argument("--bf16", action="store_true")
    ap.add_argument("--min-batch", type=int, default=1)
    ap.add_argument("--opt-batch", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=4096)
    ap.add_argument("--profiles", default=None, help="MIN:OPT:MAX[,...]; overrides the above")
    ap.add_argument("--workspace-gb", type=float, default=4.0)
    ap.add_argument("--timing-cache", default=None, help="timing cache file (read and updated)")
    args = ap.parse_args(argv)
    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    try:
        batches = parse_profiles(args.profiles, args.min_batch, args.opt_batch, args.max_batch)
        if not Path(args.onnx).is_file():
            raise ValueError(f"{args.onnx} does not exist; export it: python -m export.onnx CKPT")
        out = build_engine(Path(args.onnx), args.out and Path(args.out), precision, batches,
                           args.workspace_gb, args.timing_cache and Path(args.timing_cache))
    except (TensorRTError, ExportError, manifest.ManifestError, ValueError, OSError) as e:
        # ExportError: a failed parity check; OSError: a read-only or full --out folder
        why = checkpoint.describe_os_error(e) if isinstance(e, OSError) else e
        print(f"error: {why}", file=sys.stderr)
        return 1
    print(f"wrote {out} and {sidecar_path(out).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
