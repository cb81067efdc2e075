"""Plots of a run (the library side of `python -m engine.plot`).

    curves.png        loss, reconstruction, KL and beta per epoch, train and val (metrics.jsonl)
    latent_scatter.png  posterior means of test images coloured by label: the latent itself
                      when it is 2-D, else its first two principal components (torch.pca_lowrank)
    kl_per_dim.png    mean KL(q(z_d|x) || N(0, 1)) per latent dim over the test images, active
                      units (Cov_x E_q[z_d] > 0.01) in colour

matplotlib runs on the Agg backend (no display needed); it is imported when a plot is drawn,
so that importing this module stays cheap for the commands that never plot.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from engine import checkpoint as ckpt
from engine.analysis.evaluation import (
    gaussian_pass,
    gaussian_report,
    recon_kind,
    resolve_checkpoint,
    split_loader,
)

CURVE_KEYS = (("loss", "loss (nats)"), ("recon", "reconstruction"), ("kl", "KL"),
              ("beta", "beta"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write through a temp file + rename, so a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return ckpt.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, bbox_inches="tight"))


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line from a killed run
            continue
    if not rows:
        raise ValueError(f"{path} holds no metric rows; has the run finished an epoch?")
    return rows


def plot_curves(rows: list[dict], path: Path) -> Path:
    """2 x 2 panels: train_* and val_* of loss, recon, kl, and beta, against the epoch."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
    x = [r.get("epoch", i + 1) for i, r in enumerate(rows)]
    for ax, (key, title) in zip(axes.flat, CURVE_KEYS):
        for prefix, style in (("train_", "-"), ("val_", "--")):
            ys = [r.get(prefix + key) for r in rows]
            if key == "beta" and prefix == "val_":
                ys = [r.get("beta") for r in rows]
            if any(v is not None for v in ys):
                label = prefix.rstrip("_") if key != "beta" else \
                    ("epoch mean" if prefix == "train_" else "at epoch end")
                ax.plot(x, [float("nan") if v is None else v for v in ys], style, marker="o",
                        ms=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def project_2d(means: Tensor) -> tuple[Tensor, str]:
    """(N, 2) coordinates: the latent itself if 2-D, else the first two PCA components."""
    if means.shape[1] == 1:
        return torch.cat([means, torch.zeros_like(means)], 1), "z_0"
    if means.shape[1] == 2:
        return means, "latent"
    _, _, v = torch.pca_lowrank(means.double(), q=2, center=True, niter=4)
    return ((means.double() - means.double().mean(0)) @ v[:, :2]).float(), "PCA"


def plot_scatter(means: Tensor, labels: Tensor, path: Path, title: str = "") -> Path:
    plt = _pyplot()
    xy, kind = project_2d(means)
    fig, ax = plt.subplots(figsize=(7, 6))
    points = ax.scatter(xy[:, 0], xy[:, 1], c=labels.numpy(), cmap="tab10", s=3, alpha=0.6,
                        vmin=-0.5, vmax=9.5)
    fig.colorbar(points, ax=ax, ticks=range(10), label="label")
    prefix = "z" if kind == "latent" else "PC"
    ax.set_xlabel(f"{prefix}_1" if kind != "latent" else "z_0")
    ax.set_ylabel(f"{prefix}_2" if kind != "latent" else "z_1")
    ax.set_title(title or f"posterior means ({kind})")
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_kl_per_dim(kl_per_dim: list[float], activity: list[float], path: Path,
                    threshold: float = 0.01) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(kl_per_dim) + 2), 3.5))
    colours = ["tab:blue" if a > threshold else "tab:gray" for a in activity]
    ax.bar(range(len(kl_per_dim)), kl_per_dim, color=colours)
    active = sum(a > threshold for a in activity)
    ax.set_title(f"KL per latent dim ({active}/{len(kl_per_dim)} active, blue)")
    ax.set_xlabel("latent dim")
    ax.set_ylabel("mean KL (nats)")
    out = _save(fig, path)
    plt.close(fig)
    return out


def latent_plots(run_dir: Path, out: Path, data_dir: str | None, max_images: int) -> list[Path]:
    """Scatter and KL bars from the run's checkpoint on (up to max_images) test images."""
    model, c = ckpt.load_model(resolve_checkpoint(str(run_dir)))
    if model.family in ("vqvae", "crystal"):
        print(f"note: no latent plots for a {model.family} model (curves only)")
        return []
    train_cfg = c.config.get("train", {})
    loader = split_loader(train_cfg, "test", data_dir, 500, max_images)
    stats = gaussian_pass(model, loader, recon_kind(model, train_cfg))
    report = gaussian_report(stats, 1)
    title = f"{train_cfg.get('dataset', '')} test: posterior means"
    return [plot_scatter(stats["mean"], stats["label"], out / "latent_scatter.png", title),
            plot_kl_per_dim(report["kl_per_dim"], report["activity_per_dim"],
                            out / "kl_per_dim.png")]
