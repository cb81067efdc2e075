"""Shared pieces of the exporters: load a checkpoint, make parity inputs, check parity.

Every exporter (ONNX, AOTInductor) runs the same check: the exported graph and the eager
PyTorch export view (`model.export_parts()[part].module`) see the same fresh random inputs at
several batch sizes, and the worst error is printed and recorded in the manifest.

    max_abs = max |got - ref|
    max_rel = max_abs / max(|ref|max, 1e-12)       (relative to the output's scale)
    mismatch = fraction of differing elements       (integer outputs, e.g. VQ codes)

The check fails (ExportError, non-zero exit) when max_abs > TOLERANCE[precision] * max(1,
|ref|max), or when the mismatch fraction of integer outputs exceeds CODE_MISMATCH[precision].
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.checkpoint import CheckpointError, describe_os_error, load_model
from engine.models.latent_diffusion.pretrained import from_pretrained, is_pretrained_path
from engine.models.registry import config_to_dict
from export import manifest

PARITY_BATCHES = (1, 7, 256)

# Allowed max |got - ref| / max(1, |ref|max) against the fp32 eager model:
#   fp32: ONNX Runtime / Inductor reorder sums and fuse ops; observed errors are ~1e-7 to
#         1e-6 on sigmoid outputs, so 1e-4 catches real bugs (a wrong op is > 1e-2).
#   fp16: weights and activations rounded to a 10-bit mantissa through a few layers; one
#         rounding is ~5e-4 relative and errors compound over ~5 layers, hence 2e-2.
#   bf16: 7-bit mantissa, ~8x fp16's error.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}
# Allowed fraction of differing integer outputs (argmin codes flip on near-ties when the
# distances are rounded differently; random weights make near-ties common in fp16).
CODE_MISMATCH = {"fp32": 1e-3, "fp16": 0.1, "bf16": 0.25}


class ExportError(RuntimeError):
    """An export that failed, or whose parity check is outside tolerance."""


@dataclass
class Source:
    """A loaded checkpoint: the model (eval mode), its config dict and provenance."""

    model: torch.nn.Module
    config: dict[str, Any]
    checkpoint: Path
    step: int

    def provenance(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "step": self.step}


def on_device(part: Any, device: str) -> Any:
    """The ExportPart with its example inputs moved to `device` (module moves with the model)."""
    examples = tuple(t.to(device) for t in part.example_inputs)
    return dataclasses.replace(part, example_inputs=examples)


def part_specs(part: Any) -> tuple[list[dict], list[dict]]:
    """(input specs, output specs) of an ExportPart, outputs from one eager run."""
    with torch.no_grad():
        outputs = as_tuple(part.module(*part.example_inputs))
    return (manifest.tensor_specs(part.input_names, part.example_inputs, part.dynamic_axes),
            manifest.tensor_specs(part.output_names, outputs, {}))


def model_description(source: Source, parts: dict[str, Any]) -> dict[str, Any]:
    """The manifest's model section, from the decoder part (every family exports one)."""
    if "decoder" not in parts:
        raise ExportError(f"{source.config.get('family')}: export_parts() has no 'decoder' part;"
                          f" got {sorted(parts)}")
    return manifest.model_section(source.config, *part_specs(parts["decoder"]))


def load_source(path: str | os.PathLike, device: str = "cpu", config: str | None = None
                ) -> Source:
    """A vae-engine checkpoint, or a pretrained latent-diffusion VAE (a diffusers folder, an
    LDM single file, a TAESD pair; `config` names its preset where the file cannot)."""
    if is_pretrained_path(path):
        return model_source(from_pretrained(path, device=device, config=config), Path(path))
    if config is not None:
        raise ExportError(f"--config {config} applies to pretrained VAE files; {path} is a"
                          " checkpoint, whose config is its own")
    model, ckpt = load_model(path, device=device)
    if not hasattr(model, "export_parts"):
        raise ExportError(f"{type(model).__name__} has no export_parts(); it cannot be exported")
    return Source(model, ckpt.config["model"], ckpt.path, ckpt.step)


def model_source(model: torch.nn.Module, path: Path) -> Source:
    """A Source for a model loaded in memory (not from a checkpoint), its config as JSON holds
    it (lists, not tuples), so manifests written from it compare equal when read back."""
    return Source(model, json.loads(json.dumps(config_to_dict(model.config))), Path(path), 0)


def default_export_dir(checkpoint: Path) -> Path:
    """`<run_dir>/export`: checkpoints live in a run directory (run/last, run/best, ...); a
    pretrained VAE's exports go beside it, to `<name>-export/`."""
    if is_pretrained_path(checkpoint):
        return checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + "-export")
    return checkpoint.parent / "export"


def parity_plan(part: Any, batches: Sequence[int] | None) -> tuple[tuple[int, ...],
                                                                   tuple[tuple[Tensor, ...], ...]]:
    """(batch sizes, example input sets) of a part's parity check: `batches` when given, else
    the part's own or PARITY_BATCHES; its examples, then any at further sizes."""
    chosen = tuple(batches or part.parity_batches or PARITY_BATCHES)
    return chosen, (tuple(part.example_inputs), *part.parity_examples)


def parse_parts(text: str | None, available: Sequence[str]) -> list[str]:
    if text is None:
        return list(available)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in available]
    if unknown or not parts:
        raise ExportError(
            f"unknown part(s) {unknown or text!r}; this model exports: {', '.join(available)}"
        )
    return parts


def dynamic_shapes(part: Any) -> tuple[dict[int, Any], ...]:
    """Positional torch.export dynamic shapes of an ExportPart: one `Dim` per axis name (shared
    across inputs, e.g. "batch", "atoms"), every axis at least 1. A name "base*k" is the derived
    dim k * Dim("base") (an image side that is 8 latent pixels per latent pixel)."""
    dims: dict[str, Any] = {}

    def dim(axis: str) -> Any:
        base, _, factor = axis.partition("*")
        d = dims.setdefault(base, torch.export.Dim(base, min=1))
        return d * int(factor) if factor else d

    spec = []
    for name in part.input_names:
        axes = part.dynamic_axes.get(name, {0: "batch"})
        spec.append({i: dim(a) for i, a in axes.items()})
    return tuple(spec)


def random_inputs(
    names: Sequence[str], examples: Sequence[Tensor], config: dict[str, Any], batch: int,
    generator: torch.Generator,
) -> tuple[Tensor, ...]:
    """Fresh inputs like the part's examples at batch size `batch` (batch axis 0):

    z, z_*            N(0, I)
    images, x         U[0, 1)
    y, labels         uniform in [0, num_classes)      codes: uniform in [0, num_codes)
    anything else     rows of the part's own examples (one shared random row index per item),
                      so inputs that must agree with each other (a mask and atom types) stay valid
    """
    rows = torch.randint(examples[0].shape[0], (batch,), generator=generator)
    bounds = {"y": "num_classes", "labels": "num_classes", "codes": "num_codes"}
    out = []
    for name, ex in zip(names, examples):
        shape = (batch, *ex.shape[1:])
        bound = int(config.get(bounds.get(name, ""), 0) or 0)
        if ex.dtype.is_floating_point and (name == "z" or name.startswith("z_")):
            t = torch.randn(shape, generator=generator).to(ex.dtype)
        elif ex.dtype.is_floating_point and name in ("images", "x"):
            t = torch.rand(shape, generator=generator).to(ex.dtype)
        elif bound > 0 and not ex.dtype.is_floating_point:
            t = torch.randint(bound, shape, generator=generator).to(ex.dtype)
        else:
            t = ex.detach().cpu()[rows]
        out.append(t.to(ex.device))
    return tuple(out)


def as_tuple(outputs: Any) -> tuple[Tensor, ...]:
    if isinstance(outputs, Tensor):
        return (outputs,)
    if isinstance(outputs, dict):
        return tuple(outputs.values())
    return tuple(outputs)


def compare(ref: Sequence[Tensor], got: Sequence[Tensor]) -> dict[str, float]:
    """Worst error over all outputs: max_abs / max_rel for floats, mismatch for integers."""
    if len(ref) != len(got):
        raise ExportError(f"parity: expected {len(ref)} outputs, the export gave {len(got)}")
    stats = {"max_abs": 0.0, "max_rel": 0.0, "scale": 0.0, "mismatch": 0.0}
    for r, g in zip(ref, got):
        g = torch.as_tensor(g).to(r.device)
        if tuple(r.shape) != tuple(g.shape):
            raise ExportError(f"parity: expected an output of shape {tuple(r.shape)}, got"
                              f" {tuple(g.shape)}")
        if not r.dtype.is_floating_point:
            frac = (r != g.to(r.dtype)).double().mean().item() if r.numel() else 0.0
            stats["mismatch"] = max(stats["mismatch"], frac)
            continue
        r64, g64 = r.double(), g.double()
        if not bool(torch.isfinite(r64).all()):
            raise ExportError("parity: the PyTorch model itself gives NaN/inf on random inputs;"
                              " its weights are probably not finite: evaluate or retrain the"
                              " checkpoint before exporting it")
        err = (g64 - r64).abs().max().item() if r.numel() else 0.0
        err = math.inf if math.isnan(err) else err  # NaN where PyTorch is finite: a failure
        scale = r64.abs().max().item() if r.numel() else 0.0
        stats["max_abs"] = max(stats["max_abs"], err)
        stats["max_rel"] = max(stats["max_rel"], err / max(scale, 1e-12))
        stats["scale"] = max(stats["scale"], scale)
    return stats


def check_parity(
    label: str,
    reference: Callable[..., Any],
    exported: Callable[..., Any],
    names: Sequence[str],
    examples: Sequence[Tensor],
    config: dict[str, Any],
    precision: str = "fp32",
    batches: Sequence[int] = PARITY_BATCHES,
    seed: int = 0,
    more_examples: Sequence[Sequence[Tensor]] = (),
) -> dict[str, Any]:
    """Run both callables on the same random inputs per batch size (and per example set, e.g.
    per resolution: `examples`, then `more_examples`); print; raise if off."""
    gen = torch.Generator().manual_seed(seed)
    worst = {"max_abs": 0.0, "max_rel": 0.0, "scale": 0.0, "mismatch": 0.0}
    lines = []
    sets = (examples, *more_examples)
    for example_set in sets:
        for b in batches:
            inputs = random_inputs(names, example_set, config, b, gen)
            with torch.no_grad():
                ref = as_tuple(reference(*inputs))
            got = as_tuple(exported(*inputs))
            s = compare(ref, got)
            worst = {k: max(worst[k], s[k]) for k in worst}
            size = f" {'x'.join(map(str, inputs[0].shape[2:]))}" if len(sets) > 1 else ""
            lines.append(f"batch {b}{size}: max_abs {s['max_abs']:.3e} max_rel"
                         f" {s['max_rel']:.3e}"
                         + (f" code mismatch {s['mismatch']:.2%}" if s["mismatch"] else ""))
    tol, code_tol = TOLERANCE[precision], CODE_MISMATCH[precision]
    bound = tol * max(1.0, worst["scale"])
    ok = worst["max_abs"] <= bound and worst["mismatch"] <= code_tol
    print(f"{label} parity vs PyTorch ({precision}): " + "; ".join(lines)
          + (" -> OK" if ok else " -> FAILED"))
    result = {"batches": list(batches), "precision": precision, "max_abs": worst["max_abs"],
              "max_rel": worst["max_rel"], "code_mismatch": worst["mismatch"],
              "tolerance": tol, "code_mismatch_tolerance": code_tol, "passed": ok}
    if len(sets) > 1:  # per-item input shapes checked (e.g. two resolutions)
        result["shapes"] = [[list(t.shape[1:]) for t in example_set] for example_set in sets]
    if not ok:
        raise ExportError(
            f"{label}: parity check failed: max_abs {worst['max_abs']:.3e} (allowed {bound:.1e}),"
            f" code mismatch {worst['mismatch']:.2%} (allowed {code_tol:.1%}) against the PyTorch"
            " model; the export is wrong or the tolerance is too tight for this precision"
        )
    return result


def parse_parity_batches(text: str | None) -> tuple[int, ...] | None:
    """'1,7,256' -> (1, 7, 256); None -> None (each part's default). Every batch must be >= 1:
    a parity check over no rows would record a pass that compared nothing."""
    if text is None:
        return None
    try:
        batches = tuple(int(b) for b in text.split(","))
    except ValueError:
        message = f"--parity-batches takes batch sizes such as 1,7,256; got {text!r}"
        raise ValueError(message) from None
    if not batches or min(batches) < 1:
        raise ValueError(f"--parity-batches must list batch sizes >= 1 (a parity check of 0 rows"
                         f" compares nothing); got {text!r}")
    return batches


def run_export_cli(export: Callable[[tuple[int, ...] | None], dict[str, Path]],
                   parity_batches: str | None) -> int:
    """The exporters' shared command-line tail: parse the parity batches (None: each part's
    default), export, print what was written; a bad checkpoint, part or parity failure is one
    `error:` line and exit 1."""
    try:
        batches = parse_parity_batches(parity_batches)
        written = export(batches)
    except (ExportError, CheckpointError, manifest.ManifestError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a read-only or full --out: files already there are kept
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    for name, path in written.items():
        print(f"wrote {name}: {path}")
    return 0
