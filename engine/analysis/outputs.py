"""What the sampling commands write: image grids (PNG/JPEG) and the raw tensors behind them
(`.safetensors`), each through a temp file and a rename (engine.checkpoint.atomic_write), so a
reader never sees half a file and a failed write leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torchvision.utils import save_image

from engine.checkpoint import atomic_write


def parse_labels(text: str | None, n: int) -> torch.Tensor | int | None:
    """'3' -> 3 (all samples); '0,1,2' -> cycled over the n samples."""
    if text is None:
        return None
    values = [int(v) for v in text.split(",") if v.strip()]
    if len(values) == 1:
        return values[0]
    return torch.tensor(values, dtype=torch.int64).repeat(n // len(values) + 1)[:n]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def save_grid(images: torch.Tensor, out: str | os.PathLike, nrow: int) -> Path:
    """save_image to a temp file beside `out` (same suffix, so the format is kept), then rename."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("the decoder's outputs are not images (B, C, H, W); use the runtime API")
    out = Path(out)
    if out.suffix.lower() not in IMAGE_SUFFIXES or out.is_dir():
        raise ValueError(f"--out {out}: expected an image file path ending in"
                         f" {'/'.join(IMAGE_SUFFIXES)}, e.g. samples.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    images = images.detach().float().cpu().clamp(0, 1)
    return atomic_write(out, lambda tmp: save_image(images, tmp, nrow=nrow))


def save_tensors(png: Path, **tensors: torch.Tensor | None) -> Path:
    """The raw tensors behind a grid, as OUT.safetensors beside OUT.png (atomic)."""
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items() if v is not None}
    return atomic_write(png.with_suffix(".safetensors"), lambda tmp: save_file(flat, str(tmp)))
