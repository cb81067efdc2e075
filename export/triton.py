"""A Triton Inference Server model repository for an exported part: `python -m export.triton`.

    python -m export.triton runs/mnist/export --out model_repository
    python -m export.triton runs/mnist/export/decoder.onnx --out repo --name mnist \\
        --max-batch 64 --instances 2 --preferred-batch 16,64 --max-queue-delay-us 500
    python -m export.triton runs/mnist/export/decoder.engine --out repo     # a TensorRT plan
    tritonserver --model-repository repo                                    # then serve it

writes, all or nothing (built in a hidden folder beside, then swapped into place):

    REPO/<name>/config.pbtxt
    REPO/<name>/1/model.onnx          (platform onnxruntime_onnx), or
    REPO/<name>/1/model.plan          (platform tensorrt_plan; the plan only loads in a Triton
                                       whose TensorRT version and GPU built it)

config.pbtxt (Triton's ModelConfig in protobuf text format) holds:
  - max_batch_size N (--max-batch; 0 = Triton does not batch, dims keep the batch axis);
  - input / output: name, data_type and dims of every graph input and output, read from the
    ONNX graph (for a plan, the ONNX it was built from), without the batch axis; dynamic
    axes (a crystal's atom count) are -1. A tensor that is only the batch axis (labels (B,))
    gets dims [1] and `reshape { shape: [] }`, as Triton requires a non-empty dims;
  - dynamic_batching: preferred_batch_size and max_queue_delay_microseconds (the analogue of
    `python -m engine.serve --max-batch / --max-delay-ms`);
  - instance_group: --instances copies of the model, kind CPU / GPU / AUTO.
Triton batches across requests itself; its dynamic batcher concatenates requests along the
batch axis, which is why every input and output must have a dynamic first axis (checked).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.checkpoint import (
    atomic_write_bytes,
    describe_os_error,
    finish_interrupted_swap,
    fsync_dir,
    fsync_path,
    swap_into_place,
)
from export import manifest
from export import tensorrt as trt_export

# onnx.TensorProto element types -> Triton DataType names (model_config.proto).
ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16",
                  5: "TYPE_INT16", 6: "TYPE_INT32", 7: "TYPE_INT64", 8: "TYPE_STRING",
                  9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
                  13: "TYPE_UINT64", 16: "TYPE_BF16"}
PLATFORMS = {".onnx": ("onnxruntime_onnx", "model.onnx"),
             ".engine": ("tensorrt_plan", "model.plan"), ".plan": ("tensorrt_plan", "model.plan")}
KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}


class TritonExportError(ValueError):
    """An artifact or setting that cannot become a Triton model."""


@dataclass(frozen=True)
class Tensor:
    """One graph input or output: its name, Triton data type and full shape (-1 = dynamic)."""

    name: str
    data_type: str
    shape: tuple[int, ...]


def graph_tensors(onnx_path: Path) -> tuple[list[Tensor], list[Tensor]]:
    """(inputs, outputs) of an ONNX graph; initializers listed as inputs are left out."""
    import onnx  # optional dependency (the cpu/gpu extras): only this command needs it

    model = onnx.load(str(onnx_path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}

    def tensors(values: Any) -> list[Tensor]:
        out = []
        for v in values:
            if v.name in weights:
                continue
            t = v.type.tensor_type
            if t.elem_type not in ONNX_TO_TRITON:
                raise TritonExportError(f"{onnx_path.name}: tensor {v.name!r} has ONNX type"
                                        f" {t.elem_type}, which Triton has no data type for")
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            out.append(Tensor(v.name, ONNX_TO_TRITON[t.elem_type], shape))
        return out

    return tensors(model.graph.input), tensors(model.graph.output)


def model_file(artifact: Path, part: str) -> Path:
    """The .onnx / .engine / .plan file of `part`: the artifact itself, or from an export
    directory's manifest (ONNX first, as it runs on every Triton)."""
    if artifact.is_dir() or manifest.settled(artifact) is not None:
        artifact = manifest.settled(artifact) or artifact  # a crash mid-commit: its whole copy
        try:
            listed = manifest.find(manifest.read(artifact, missing_ok=False), part,
                                   formats=("onnx", "tensorrt"))
        except manifest.ManifestError as e:
            raise TritonExportError(str(e)) from e
        fp32 = [f for f, e in listed if e.get("precision") == "fp32"]
        if not listed:
            raise TritonExportError(f"{artifact}: the manifest lists no ONNX or TensorRT {part};"
                                    f" export one: python -m export.onnx CKPT --parts {part}")
        return artifact / (fp32 or [f for f, _ in listed])[0]
    if artifact.suffix not in PLATFORMS:
        raise TritonExportError(f"{artifact}: expected an export directory or a"
                                f" {'/'.join(PLATFORMS)} file")
    if not artifact.is_file():
        raise TritonExportError(f"{artifact} does not exist")
    return artifact


def plan_source(engine: Path, max_batch: int) -> Path:
    """The ONNX file a TensorRT engine was built from (its I/O), checked against the batch."""
    try:
        sidecar = trt_export.read_sidecar(engine)
    except trt_export.TensorRTError as e:
        raise TritonExportError(str(e)) from e
    lo, hi = sidecar.get("batch_range") or trt_export.batch_range(sidecar["profiles"])
    if max_batch > hi or lo > 1:
        raise TritonExportError(f"{engine.name} was built for batches [{lo}, {hi}]; Triton sends"
                                f" batches of 1..--max-batch {max_batch}: pick --max-batch <="
                                f" {hi} or rebuild with python -m export.tensorrt --profiles"
                                f" 1:OPT:{max_batch}")
    onnx_path = engine.parent / sidecar.get("onnx", "")
    if not onnx_path.is_file():
        raise TritonExportError(f"{engine.name}: the ONNX it was built from ({onnx_path}) is"
                                " not beside it; its inputs and outputs are read from there")
    return onnx_path


def _dims_text(t: Tensor, max_batch: int) -> str:
    if max_batch == 0:
        return f"    dims: [ {', '.join(map(str, t.shape))} ]\n"
    if not t.shape or t.shape[0] != -1:
        raise TritonExportError(f"tensor {t.name!r} has shape {list(t.shape)} without a dynamic"
                                " batch axis first; Triton batches along axis 0: re-export with"
                                " a dynamic batch or pass --max-batch 0")
    dims = t.shape[1:]
    if not dims:  # Triton needs non-empty dims: (B,) is dims [1] reshaped to []
        return "    dims: [ 1 ]\n    reshape { shape: [ ] }\n"
    return f"    dims: [ {', '.join(map(str, dims))} ]\n"


def _tensors_text(kind: str, tensors: list[Tensor], max_batch: int) -> str:
    blocks = [f"  {{\n    name: \"{t.name}\"\n    data_type: {t.data_type}\n"
              f"{_dims_text(t, max_batch)}  }}" for t in tensors]
    return f"{kind} [\n" + ",\n".join(blocks) + "\n]\n"


def config_text(name: str, platform: str, inputs: list[Tensor], outputs: list[Tensor],
                max_batch: int, instances: int, kind: str, preferred: list[int],
                max_queue_delay_us: int, source: str) -> str:
    """config.pbtxt: Triton's ModelConfig in protobuf text format."""
    text = (f"# written by python -m export.triton from {source}\n"
            f"name: \"{name}\"\nplatform: \"{platform}\"\nmax_batch_size: {max_batch}\n"
            + _tensors_text("input", inputs, max_batch) + _tensors_text("output", outputs,
                                                                         max_batch))
    if max_batch > 0:
        sizes = f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n" \
            if preferred else ""
        text += (f"dynamic_batching {{\n{sizes}"
                 f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n")
    return text + (f"instance_group [\n  {{\n    count: {instances}\n    kind: {KINDS[kind]}\n"
                   "  }\n]\n")


def default_name(model: Path, part: str) -> str:
    """<run>_<part> for runs/<run>/export/<part>.onnx, else <directory>_<part>."""
    folder = model.parent
    base = folder.parent.name if folder.name == "export" else folder.name
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{base}_{part}").strip("_") or part


def write_model_dir(repo: Path, name: str, config: str, model: Path, file_name: str) -> Path:
    """REPO/<name>/{config.pbtxt, 1/<file_name>}, all or nothing: built in the hidden
    `REPO/.<name>.tmp/` (model file fsynced, config.pbtxt written last), then swapped in through
    `REPO/.<name>.old/` like a checkpoint. A swap that a crash interrupted (no `<name>/`) is
    settled first: the complete new copy, else the old one, is put back in place."""
    repo.mkdir(parents=True, exist_ok=True)
    final, tmp, old = repo / name, repo / f".{name}.tmp", repo / f".{name}.old"
    finish_interrupted_swap(final, tmp, old, _complete, "config.pbtxt")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "1").mkdir(parents=True)
        shutil.copyfile(model, tmp / "1" / file_name)
        fsync_path(tmp / "1" / file_name)
        fsync_dir(tmp / "1")
        atomic_write_bytes(tmp / "config.pbtxt", config.encode())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_into_place(tmp, final, old)
    return final


def _complete(model_dir: Path) -> bool:
    """config.pbtxt is written last: with it, the version folder is whole."""
    return (model_dir / "config.pbtxt").is_file() and (model_dir / "1").is_dir()


def export_triton(artifact: str | os.PathLike, out: str | os.PathLike, name: str | None = None,
                  part: str = "decoder", max_batch: int = 64, instances: int = 1,
                  kind: str = "auto", preferred: list[int] | None = None,
                  max_queue_delay_us: int = 100) -> Path:
    """Write the model directory; returns REPO/<name>."""
    preferred = sorted(set(preferred or []))
    if max_batch < 0 or instances < 1 or max_queue_delay_us < 0 or kind not in KINDS:
        raise TritonExportError(f"need --max-batch >= 0, --instances >= 1, --max-queue-delay-us"
                                f" >= 0 and --kind in {list(KINDS)}; got {max_batch},"
                                f" {instances}, {max_queue_delay_us}, {kind!r}")
    if any(b < 1 or b > max_batch for b in preferred):
        raise TritonExportError(f"--preferred-batch {preferred}: each size must lie in [1,"
                                f" --max-batch {max_batch}]")
    model = model_file(Path(artifact), part)
    platform, file_name = PLATFORMS[model.suffix]
    graph = plan_source(model, max_batch) if platform == "tensorrt_plan" else model
    inputs, outputs = graph_tensors(graph)
    name = name or default_name(model, part)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise TritonExportError(f"--name {name!r}: use letters, digits, '_' and '-' only")
    text = config_text(name, platform, inputs, outputs, max_batch, instances, kind, preferred,
                       max_queue_delay_us, model.name)
    return write_model_dir(Path(out), name, text, model, file_name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.triton", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", help="export directory, or an .onnx / .engine / .plan file")
    ap.add_argument("--out", required=True, help="the model repository (created if needed)")
    ap.add_argument("--name", default=None, help="model name (default <run>_<part>)")
    ap.add_argument("--part", default="decoder", help="part of an export directory")
    ap.add_argument("--max-batch", type=int, default=64, help="max_batch_size (0: no batching)")
    ap.add_argument("--instances", type=int, default=1, help="instance_group count")
    ap.add_argument("--kind", default="auto", help="instance kind: auto, cpu or gpu")
    ap.add_argument("--preferred-batch", default="", help="comma-separated, e.g. 16,64")
    ap.add_argument("--max-queue-delay-us", type=int, default=100,
                    help="dynamic_batching max_queue_delay_microseconds (default 100)")
    args = ap.parse_args(argv)
    try:
        preferred = [int(v) for v in args.preferred_batch.split(",") if v.strip()]
        path = export_triton(args.artifact, args.out, args.name, args.part, args.max_batch,
                             args.instances, args.kind, preferred, args.max_queue_delay_us)
    except ValueError as e:  # TritonExportError, and int() of a bad --preferred-batch
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full --out
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    print(f"wrote {path}/config.pbtxt and {path}/1/; serve with: tritonserver"
          f" --model-repository {path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
