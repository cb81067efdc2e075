"""ONNX export of every part of a checkpoint, each checked against PyTorch.

    python -m export.onnx runs/mnist-conv                    # -> runs/mnist-conv/export/*.onnx
    python -m export.onnx runs/mnist-conv/best --out out/ --parts decoder --fp16
    python -m export.onnx sdxl_vae.safetensors --config sdxl --out sdxl-vae-onnx/

Parts come from `model.export_parts()`: decoder.onnx (z [+ y] -> images, or codes -> images for
the VQ-VAE), encoder.onnx (images [+ y] -> mu, logvar, or images -> codes), and whatever another
family declares. Each graph:
  - is exported with torch.onnx.export(dynamo=True) at opset DEFAULT_OPSET (20: the exporter's
    default in torch 2.11-2.14; ONNX Runtime >= 1.17 and TensorRT 10 parse it), with a dynamic
    batch axis, weights inside the file (no .onnx.data);
  - is simplified by the onnxscript optimizer (constant folding, dead code; the node counts before
    and after are recorded in the manifest);
  - holds no random op (scanned: Random*, Bernoulli, Multinomial); the noise is an input;
  - carries metadata_props: the model config JSON, latent shape, output shape, input names, ...
    (`export.manifest.artifact_metadata`);
  - is run by ONNX Runtime (CPU) against the eager model at batches 1, 7, 256 (latent-diffusion
    VAEs: 1, 3, at two resolutions; their height and width are dynamic too); the errors are
    printed, and above tolerance the command fails with exit code 1.
A pretrained latent-diffusion VAE (diffusers folder, LDM single file, TAESD pair) exports like a
checkpoint, by default to `<path>-export/`; see docs/latent_diffusion.md.
--fp16 writes <part>.fp16.onnx: weights and compute in fp16, inputs and outputs stay fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import atomic_write_bytes
from engine.models.export_wrappers import CastView
from export import manifest
from export.common import (
    ExportError,
    check_parity,
    default_export_dir,
    dynamic_shapes,
    load_source,
    model_description,
    parity_plan,
    parse_parts,
    part_specs,
    run_export_cli,
)

DEFAULT_OPSET = 20
MIN_OPSET = 18  # the dynamo exporter emits opset 18 and later
RANDOM_OPS = ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
              "Bernoulli", "Multinomial")


def _all_nodes(graph: Any):
    """Nodes of a graph and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def random_ops(model: Any) -> list[str]:
    """op_types of random nodes anywhere in the model (graph, subgraphs, local functions)."""
    nodes = list(_all_nodes(model.graph))
    for fn in model.functions:
        nodes += list(fn.node)
    return sorted({n.op_type for n in nodes if n.op_type in RANDOM_OPS
                   or n.op_type.startswith("Random")})


def to_onnx(part: Any, opset: int, fp16: bool, optimize: bool = True) -> tuple[Any, dict]:
    """torch.onnx.export of an ExportPart -> (onnx.ModelProto, settings)."""
    module = CastView(part.module, torch.float16) if fp16 else part.module
    per_input = dynamic_shapes(part)
    # CastView takes *inputs: torch.export wants the varargs' shapes nested one level down.
    shapes = (per_input,) if fp16 else per_input
    quiet = logging.getLogger("onnxscript")  # a failed opset conversion logs a traceback;
    level, quiet.level = quiet.level, logging.CRITICAL  # the opset check below reports it
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(), tuple(part.example_inputs), dynamo=True, opset_version=opset,
            input_names=list(part.input_names), output_names=list(part.output_names),
            dynamic_shapes=shapes, external_data=False, optimize=False, verbose=False)
        before = len(program.model_proto.graph.node)
        if optimize:
            program.optimize()
    quiet.setLevel(level)
    proto = program.model_proto
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:  # the converter falls back silently; what is recorded must be what ran
        raise ExportError(f"--opset {opset}: the exporter produced opset {got} instead; use an"
                          f" opset it can convert to (from {MIN_OPSET}; default {DEFAULT_OPSET})")
    settings = {"opset": opset, "fp16": fp16, "optimize": optimize, "exporter": "dynamo",
                "torch": torch.__version__, "nodes_before_optimize": before,
                "nodes": len(proto.graph.node)}
    return proto, settings


def finish(proto: Any, metadata: dict[str, str], label: str) -> bytes:
    """Check the graph, refuse random ops, attach metadata; serialized bytes."""
    import onnx

    found = random_ops(proto)
    if found:
        raise ExportError(f"{label}: the graph contains random ops {found}; keep the noise a"
                          " graph input (TensorRT ignores their seeds), e.g. pass z instead of"
                          " sampling it inside forward()")
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "vae-engine"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def ort_runner(path: Path):
    """Callable running an ONNX file on the ONNX Runtime CPU provider, torch in and out."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph/... types
        why = str(e).split("Current official support")[-1].strip() or str(e).splitlines()[0]
        raise ExportError(f"ONNX Runtime {ort.__version__} cannot load {path.name} ({why[:200]});"
                          f" export at a lower --opset (default {DEFAULT_OPSET})") from e
    names = [i.name for i in session.get_inputs()]

    def run(*inputs: torch.Tensor) -> list[torch.Tensor]:
        feed = {n: t.detach().cpu().contiguous().numpy() for n, t in zip(names, inputs)}
        return [torch.from_numpy(o) for o in session.run(None, feed)]

    return run


def export_part(source: Any, parts: dict, name: str, out_dir: Path, opset: int, fp16: bool,
                batches: tuple[int, ...] | None = None) -> tuple[Path, dict]:
    """Write `<out_dir>/<name>[.fp16].onnx` and check it; returns (path, manifest entry)."""
    part = parts[name]
    part.module.eval()
    inputs, outputs = part_specs(part)
    model = model_description(source, parts)
    precision = "fp16" if fp16 else "fp32"
    path = out_dir / (f"{name}.fp16.onnx" if fp16 else f"{name}.onnx")
    proto, settings = to_onnx(part, opset, fp16)
    meta = manifest.artifact_metadata(model, name, inputs, outputs, "any", precision)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, finish(proto, meta, path.name))
    batches, examples = parity_plan(part, batches)
    parity = check_parity(path.name, part.module, ort_runner(path), part.input_names,
                          examples[0], source.config, precision, batches,
                          more_examples=examples[1:])
    import onnxruntime

    settings["onnxruntime_checked"] = onnxruntime.__version__
    entry = manifest.artifact_entry(path, name, "onnx", inputs=inputs, outputs=outputs,
                                    precision=precision, device="any", settings=settings,
                                    parity=parity, source=source.provenance())
    return path, entry


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None,
                opset: int = DEFAULT_OPSET, fp16: bool = False, parts: str | None = None,
                batches: tuple[int, ...] | None = None, config: str | None = None
                ) -> dict[str, Path]:
    """Export the chosen parts (default: all) of a checkpoint, or of a pretrained VAE (`config`:
    its preset where the file cannot tell); update `<out>/manifest.json`."""
    import onnx

    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ExportError(f"--opset {opset}: expected {MIN_OPSET} (the dynamo exporter's lowest)"
                          f" to {onnx.defs.onnx_opset_version()} (this onnx's highest)")
    source = load_source(checkpoint, config=config)
    out_dir = Path(out) if out is not None else default_export_dir(source.checkpoint)
    return export_source(source, out_dir, opset, fp16, parts, batches)


def export_source(source: Any, out_dir: Path, opset: int = DEFAULT_OPSET, fp16: bool = False,
                  parts: str | None = None, batches: tuple[int, ...] | None = None
                  ) -> dict[str, Path]:
    """export_onnx of an already loaded model (a `Source`) into `out_dir`: every part is written
    and checked in a staging folder, then committed with the manifest at once (a failed part
    leaves `out_dir` as it was)."""
    all_parts = source.model.export_parts()
    written, files = {}, {}
    with manifest.staging(out_dir) as stage:  # written and checked here, then moved in at once
        for name in parse_parts(parts, list(all_parts)):
            path, entry = export_part(source, all_parts, name, stage, opset, fp16, batches)
            written[name], files[path.name] = out_dir / path.name, (path, entry)
        manifest.commit(out_dir, model_description(source, all_parts), files)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="checkpoint or run directory, or a pretrained"
                    " latent-diffusion VAE: diffusers folder, .safetensors file, TAESD pair")
    ap.add_argument("--config", default=None,
                    help="preset of a pretrained VAE file whose shapes are ambiguous: sd15, sdxl,"
                         " sd3, flux, taesd, taesdxl, taef1 (default: from the shapes)")
    ap.add_argument("--out", default=None, help="export directory (default <run_dir>/export)")
    ap.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    ap.add_argument("--fp16", action="store_true", help="fp16 weights/compute, fp32 I/O")
    ap.add_argument("--parts", default=None, help="comma-separated parts (default: all)")
    ap.add_argument("--parity-batches", default=None,
                    help="comma-separated batch sizes (default: 1,7,256; 1,3 for latent-diffusion"
                         " VAEs, at two resolutions)")
    args = ap.parse_args(argv)
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    return run_export_cli(lambda batches: export_onnx(args.checkpoint, args.out, args.opset,
                                                      args.fp16, args.parts, batches,
                                                      args.config),
                          args.parity_batches)

if __name__ == "__main__":
    sys.exit(main())
