"""engine.plot: curves, latent scatter (2-D and PCA), KL bars, and the RUN_DIR command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt
from engine import plot
from engine.analysis import plots
from engine.models.registry import build_model

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = os.environ.get("VAE_DATA_DIR", str(REPO.parent / "shared" / "datasets"))
needs_mnist = pytest.mark.skipif(not Path(DATA_DIR, "MNIST", "raw").is_dir(),
                                 reason=f"MNIST not found under {DATA_DIR}; set VAE_DATA_DIR")
PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(run: Path, epochs: int = 3) -> None:
    run.mkdir(parents=True, exist_ok=True)
    rows = [{"epoch": e, "step": 10 * e, "train_loss": 200 - e, "train_recon": 180 - e,
             "train_kl": 20.0, "train_beta": 1.0, "val_loss": 201 - e, "val_recon": 181 - e,
             "val_kl": 20.0, "beta": min(1.0, e / 2)} for e in range(1, epochs + 1)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 4, "trunc'  # torn line
    (run / "metrics.jsonl").write_text(text)


def test_curves_png_from_metrics_with_a_torn_line(tmp_path):
    write_metrics(tmp_path)
    rows = plots.read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 3
    out = plots.plot_curves(rows, tmp_path / "plots" / "curves.png")
    assert out.read_bytes()[:8] == PNG


@pytest.mark.parametrize("latent_dim", [2, 7])
def test_scatter_png_direct_or_pca(tmp_path, latent_dim):
    means = torch.randn(400, latent_dim)
    xy, kind = plots.project_2d(means)
    assert xy.shape == (400, 2) and kind == ("latent" if latent_dim == 2 else "PCA")
    if latent_dim > 2:  # PCA coordinates are centred and ordered by variance
        assert xy.mean(0).abs().max() < 1e-4 and xy[:, 0].var() >= xy[:, 1].var()
    out = plots.plot_scatter(means, torch.randint(10, (400,)), tmp_path / "s.png")
    assert out.read_bytes()[:8] == PNG


def test_kl_bar_png(tmp_path):
    out = plots.plot_kl_per_dim([0.0, 2.5, 0.01], [0.0, 1.0, 0.005], tmp_path / "kl.png")
    assert out.read_bytes()[:8] == PNG


@needs_mnist
def test_cli_writes_every_plot_into_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    write_metrics(run)
    torch.manual_seed(0)
    model = build_model("mlp", hidden_dims=(16,), latent_dim=3)
    ckpt.save(run / "best", model, train_config={"dataset": "mnist", "data_dir": DATA_DIR})
    assert plot.main([str(run), "--max-images", "300"]) == 0
    names = sorted(p.name for p in (run / "plots").iterdir())
    assert names == ["curves.png", "kl_per_dim.png", "latent_scatter.png"]
    assert all((run / "plots" / n).read_bytes()[:8] == PNG for n in names)


def test_cli_rejects_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
