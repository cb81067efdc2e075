"""Fixtures for the export tests: one small checkpoint per model family, exported once.

The AOTInductor compiles (~15-25 s each on 2 cores) are the slow part, so every fixture that
exports is session-scoped and shared: one ONNX export (all parts) and one AOTI compile (decoder)
per family for the whole suite, both through the command lines (`main(argv)`), so the CLI
paths are covered by the same runs.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# family -> (registry family, preset, overrides): small, so exports and compiles stay quick.
FAMILIES = {
    "mlp": ("mlp", "mlp-mnist", {"hidden_dims": (64,), "latent_dim": 8}),
    "cvae-mlp": ("cvae-mlp", "cvae-mlp-mnist", {"hidden_dims": (64,), "latent_dim": 8}),
    "conv": ("conv", "conv-small", {}),
    "cvae-conv": ("cvae-conv", "cvae-conv-mnist", {"hidden_dims": (16, 32), "latent_dim": 8}),
    "vqvae": ("vqvae", "vqvae-small", {}),
    "crystal": ("crystal", "crystal-small", {}),  # multi-head decoder with a mask input
}


def make_checkpoint(run_dir: Path, family: str, seed: int = 0) -> Path:
    """A run directory with last/ holding a randomly initialised model of `family`.

    BatchNorm running statistics are randomised too, so folding them into the graph is tested."""
    from engine.checkpoint import save
    from engine.models import build_model

    name, preset, overrides = FAMILIES[family]
    torch.manual_seed(seed)
    model = build_model(name, preset=preset, **overrides)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    save(run_dir / "last", model.eval())
    return run_dir


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """family -> run dir (built on first use)."""
    root = tmp_path_factory.mktemp("runs")
    @functools.cache
    def get(family: str) -> Path:
        return make_checkpoint(root / family, family)

    return get


@pytest.fixture(scope="session")
def onnx_exported(checkpoints):
    """family -> export dir with decoder.onnx + encoder.onnx, written by `export.onnx.main`."""
    from export import onnx as onnx_export

    @functools.cache
    def get(family: str) -> Path:
        run = checkpoints(family)
        assert onnx_export.main([str(run)]) == 0
        return run / "export"

    return get


@pytest.fixture(scope="session")
def aoti_exported(onnx_exported):
    """family -> export dir that also holds decoder.pt2 (one compile per family)."""
    from export import aoti

    @functools.cache
    def get(family: str) -> Path:
        out = onnx_exported(family)
        assert aoti.main([str(out.parent), "--out", str(out)]) == 0
        return out

    return get
