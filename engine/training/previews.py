"""Per-epoch previews: a grid of prior samples and a grid of reconstructions (PNG)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.utils import save_image

from engine.checkpoint import atomic_write

PREVIEW_SEED = 0  # the same latents every epoch, so grids are comparable across epochs


def save_image_atomic(images: Tensor, path: Path, **grid_kwargs) -> Path:
    """torchvision's save_image through a temp file + rename: no half-written PNGs (a failed
    write leaves no temp file and raises an OSError naming `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = images.detach().float().cpu().clamp(0, 1)
    return atomic_write(path, lambda tmp: save_image(images, tmp, **grid_kwargs))


def preview_labels(model: nn.Module, n: int, device) -> Tensor | None:
    if not getattr(model, "conditional", False):
        return None
    return torch.arange(n, device=device) % model.config.num_classes


@torch.no_grad()
def write_previews(model: nn.Module, loader, out: Path, epoch: int, device) -> None:
    """samples/epoch_NNN.png (64 prior samples) and recon/epoch_NNN.png (originals over
    reconstructions); families with their own artifacts (crystals) implement epoch_artifacts."""
    was_training = model.training
    model.eval()
    loader.set_epoch(0)
    batch = next(iter(loader))
    if hasattr(model, "epoch_artifacts"):
        model.epoch_artifacts(batch, out, epoch)
    else:
        x, y = (t.to(device) for t in batch)
        n = min(32, x.shape[0])
        x, y = x[:n], (y[:n] if model.conditional else None)
        samples = model.sample(64, preview_labels(model, 64, device), seed=PREVIEW_SEED)
        save_image_atomic(samples, out / "samples" / f"epoch_{epoch:03d}.png", nrow=8)
        pairs = torch.cat([x, model.reconstruct(x, y)])
        save_image_atomic(pairs, out / "recon" / f"epoch_{epoch:03d}.png", nrow=8)
    model.train(was_training)
