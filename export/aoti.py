"""AOTInductor export: a checkpoint's decoder as a self-contained `.pt2` package.

    python -m export.aoti runs/mnist-mlp              # -> runs/mnist-mlp/export/decoder.pt2
    python -m export.aoti runs/mnist-mlp/best --out out/ --device cuda --parts decoder,encoder
    python -m export.aoti ae.safetensors --config flux --out flux-vae/   # dynamic batch, H, W

torch.export traces the export view (`model.export_parts()`) with a dynamic batch `Dim`, then
`torch._inductor.aoti_compile_and_package` compiles it for one device (a CUDA package runs on
CUDA only). The weights are compiled into the shared library (`package_constants_in_so`), so the
.pt2 is the only file needed. The package embeds `export.manifest.artifact_metadata()`, a string map
the C++ runner reads with `AOTIModelPackageLoader::get_metadata()`, e.g. for an MLP decoder:

    {"latent_shape": "20", "output_shape": "1,28,28", "input_names": "z", "conditional": "0",
     "num_classes": "0", "latent_kind": "gaussian", "latent_dtype": "float32", ...}

Python loads it with `torch._inductor.aoti_load_package(path)` (or `engine.runtime.Sampler`).
After compiling, the package is loaded and checked against eager PyTorch at batches 1, 7, 256;
the result goes into `<out>/manifest.json`. Works on torch 2.11 and 2.14 (config keys that a
version does not know are left out, see `_inductor_configs`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import atomic_write
from export import manifest
from export.common import (
    ExportError,
    check_parity,
    default_export_dir,
    dynamic_shapes,
    load_source,
    model_description,
    on_device,
    parity_plan,
    parse_parts,
    part_specs,
    run_export_cli,
)


def export_program(part: Any) -> torch.export.ExportedProgram:
    """torch.export of an ExportPart with its dynamic axes (batch >= 1)."""
    module = part.module.eval()
    with torch.no_grad():
        return torch.export.export(module, tuple(part.example_inputs),
                                   dynamic_shapes=dynamic_shapes(part))


def _inductor_configs(metadata: dict[str, str]) -> dict[str, Any]:
    """Inductor options this torch version accepts (unknown keys raise in aoti_compile)."""
    from torch._inductor import config as inductor_config

    wanted = {"aot_inductor.package_constants_in_so": True, "aot_inductor.metadata": metadata}
    return {k: v for k, v in wanted.items()
            if hasattr(inductor_config.aot_inductor, k.split(".", 1)[1])}


def compile_package(program: torch.export.ExportedProgram, path: Path,
                    metadata: dict[str, str]) -> Path:
    """Compile into a private temp folder, then copy to `path` atomically (temp file beside it,
    then rename). torch's archive writer aborts the whole process (std::terminate) when its
    disk fills up, so it never writes to the output folder, which may be full."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vae-aoti-") as work:
        package = Path(work) / path.name
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(package), inductor_configs=_inductor_configs(metadata))
        return atomic_write(path, lambda tmp: shutil.copyfile(package, tmp))


def export_part(source: Any, name: str, out_dir: Path, device: str,
                batches: tuple[int, ...] | None = None) -> tuple[Path, dict, dict]:
    """Compile one part to `<out_dir>/<name>.pt2`; returns (path, manifest entry, model section)."""
    parts = {k: on_device(p, device) for k, p in source.model.export_parts().items()}
    part = parts[name]
    part.module.eval()
    inputs, outputs = part_specs(part)
    model = model_description(source, parts)
    meta = manifest.artifact_metadata(model, name, inputs, outputs, device)
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # torch 2.11 warns about its own treespec pickling
        warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
        path = compile_package(export_program(part), out_dir / f"{name}.pt2", meta)
    seconds = time.perf_counter() - t0
    runner = torch._inductor.aoti_load_package(str(path))
    batches, examples = parity_plan(part, batches)
    parity = check_parity(path.name, part.module, runner, part.input_names, examples[0],
                          source.config, "fp32", batches, more_examples=examples[1:])
    settings = {"torch": torch.__version__, "compile_seconds": round(seconds, 1),
                "inductor_configs": sorted(_inductor_configs({}))}
    entry = manifest.artifact_entry(path, name, "aoti", inputs=inputs, outputs=outputs,
                                    precision="fp32", device=device, settings=settings,
                                    parity=parity, source=source.provenance())
    return path, entry, model


def export_aoti(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None,
                device: str = "cpu", parts: str | None = "decoder",
                batches: tuple[int, ...] | None = None, config: str | None = None
                ) -> dict[str, Path]:
    """Compile the chosen parts of a checkpoint (or a pretrained VAE, `config` naming its preset
    where the file cannot) to `<out>/<part>.pt2`; update the manifest."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda: no CUDA device is visible; use --device cpu")
    source = load_source(checkpoint, device=device, config=config)
    out_dir = Path(out) if out is not None else default_export_dir(source.checkpoint)
    return export_source(source, out_dir, device, parts, batches)


def export_source(source: Any, out_dir: Path, device: str = "cpu", parts: str | None = "decoder",
                  batches: tuple[int, ...] | None = None) -> dict[str, Path]:
    """export_aoti of an already loaded model (a `Source`) into `out_dir`, staged and committed
    at once like export.onnx's."""
    names = parse_parts(parts, list(source.model.export_parts()))
    written, files, model = {}, {}, None
    with manifest.staging(out_dir) as stage:  # compiled and checked here, then moved in at once
        for name in names:
            path, entry, model = export_part(source, name, stage, device, batches)
            written[name], files[path.name] = out_dir / path.name, (path, entry)
        manifest.commit(out_dir, model, files)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.aoti", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="checkpoint or run directory, or a pretrained"
                    " latent-diffusion VAE: diffusers folder, .safetensors file, TAESD pair")
    ap.add_argument("--config", default=None,
                    help="preset of a pretrained VAE file whose shapes are ambiguous: sd15, sdxl,"
                         " sd3, flux, taesd, taesdxl, taef1 (default: from the shapes)")
    ap.add_argument("--out", default=None, help="export directory (default <run_dir>/export)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--parts", default="decoder", help="comma-separated parts (default decoder)")
    ap.add_argument("--parity-batches", default=None,
                    help="comma-separated batch sizes (default: 1,7,256; 1,3 for latent-diffusion"
                         " VAEs, at two resolutions)")
    args = ap.parse_args(argv)
    return run_export_cli(lambda batches: export_aoti(args.checkpoint, args.out, args.device,
                                                      args.parts, batches, args.config),
                          args.parity_batches)

if __name__ == "__main__":
    sys.exit(main())
