"""Latent-space tools: grids, traversals, interpolations and class rows (pure functions).

    z = latent_grid(latent_dim=2, dims=(0, 1), n=15, lo=-3, hi=3)        # (225, 2)
    z = traversal(base=mu[0], dims=range(L), k=3, steps=9)               # (L * 9, L)
    z = interpolate(z_a, z_b, steps=10, method="slerp")                  # (10, L)

The `*_images` functions run a model's decoder on those latents and return image batches
(N, C, H, W) ready for `torchvision.utils.make_grid(..., nrow=...)`; `engine.sample` wraps
them as subcommands. They depend only on the model protocol (encode -> DiagonalGaussian,
decode, latent_shape, conditional), never on a concrete class.

Slerp (Shoemake 1985; White 2016, https://arxiv.org/abs/1609.04468):
    omega = arccos(<a, b> / (|a| |b|))
    slerp(a, b; t) = sin((1 - t) omega) / sin(omega) a + sin(t omega) / sin(omega) b
It falls back to lerp when a and b are (anti)parallel within 1e-6, where sin(omega) ~ 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine import checkpoint as ckpt
from engine.analysis.evaluation import split_loader
from engine.distributions import DiagonalGaussian
from engine.runtime import Sampler

INTERPOLATIONS = ("lerp", "slerp")


def check_dims(dims: Sequence[int], latent_dim: int, where: str) -> list[int]:
    dims = [int(d) for d in dims]
    bad = [d for d in dims if not 0 <= d < latent_dim]
    if bad:
        raise ValueError(f"{where}: latent dims {bad} are out of range; this model's latent has"
                         f" {latent_dim} dims, valid indices are 0..{latent_dim - 1}")
    return dims


def latent_grid(latent_dim: int, dims: tuple[int, int] = (0, 1), n: int = 15, lo: float = -3.0,
                hi: float = 3.0, base: Tensor | None = None) -> Tensor:
    """An n x n grid over latent dims (i, j), row-major: (n * n, latent_dim).

    Columns sweep dim i from lo to hi (left to right); rows sweep dim j from hi to lo (top to
    bottom), as in a scatter plot. Every other dim is `base` (default 0: the prior mean).
    """
    i, j = check_dims(dims, latent_dim, "latent_grid")
    if i == j:
        raise ValueError(f"latent_grid: the two dims must differ, got ({i}, {j})")
    if n < 2 or not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"latent_grid: need n >= 2 and lo < hi, got n={n}, lo={lo}, hi={hi}")
    base = torch.zeros(latent_dim) if base is None else base.detach().reshape(latent_dim)
    values = torch.linspace(lo, hi, n, dtype=base.dtype, device=base.device)
    z = base.repeat(n * n, 1)  # (n * n, L)
    z[:, i] = values.repeat(n)  # column index
    z[:, j] = values.flip(0).repeat_interleave(n)  # row index, top = hi
    return z


def traversal(base: Tensor, dims: Sequence[int] | None = None, k: float = 3.0,
              steps: int = 9) -> Tensor:
    """Each dim of `dims` swept over linspace(-k, k, steps), the others fixed at `base`.

    base: (L,) e.g. the posterior mean of one image. Returns (len(dims) * steps, L): row r of
    the image grid is dims[r], so `make_grid(decode(z), nrow=steps)` shows one dim per row.
    """
    latent_dim = base.numel()
    dims = check_dims(range(latent_dim) if dims is None else dims, latent_dim, "traversal")
    if steps < 2 or not (math.isfinite(k) and k > 0):
        raise ValueError(f"traversal: need steps >= 2 and a finite k > 0, got steps={steps}, k={k}")
    values = torch.linspace(-k, k, steps, dtype=base.dtype, device=base.device)
    z = base.detach().reshape(1, 1, latent_dim).repeat(len(dims), steps, 1)  # (D, S, L)
    for row, d in enumerate(dims):
        z[row, :, d] = values
    return z.reshape(len(dims) * steps, latent_dim)


def lerp(a: Tensor, b: Tensor, steps: int) -> Tensor:
    """(1 - t) a + t b for t in linspace(0, 1, steps): (steps, *a.shape); exact endpoints."""
    t = _weights(a, steps)  # (steps, 1, ...); torch.lerp returns `b` exactly at t = 1
    return torch.lerp(a.unsqueeze(0), b.unsqueeze(0), t)


def slerp(a: Tensor, b: Tensor, steps: int, eps: float = 1e-6) -> Tensor:
    """Spherical interpolation (see the module docstring): (steps, *a.shape)."""
    af, bf = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = af.norm(), bf.norm()
    if na < eps or nb < eps:
        return lerp(a, b, steps)
    cos = (af @ bf / (na * nb)).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    if torch.sin(omega).abs() < eps:
        return lerp(a, b, steps)
    t = torch.linspace(0, 1, steps, dtype=torch.float64, device=a.device)[:, None]
    sin = torch.sin(omega)
    out = torch.sin((1 - t) * omega) / sin * af + torch.sin(t * omega) / sin * bf  # (steps, numel)
    out[0], out[-1] = af, bf  # exact endpoints despite rounding
    return out.to(a.dtype).reshape(steps, *a.shape)


def interpolate(a: Tensor, b: Tensor, steps: int, method: str = "lerp") -> Tensor:
    if a.shape != b.shape:
        raise ValueError(f"interpolate: endpoints differ in shape, {tuple(a.shape)} vs"
                         f" {tuple(b.shape)}")
    if method not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {method!r}; valid: {', '.join(INTERPOLATIONS)}")
    return lerp(a, b, steps) if method == "lerp" else slerp(a, b, steps)


def _weights(a: Tensor, steps: int) -> Tensor:
    if steps < 2:
        raise ValueError(f"interpolation needs steps >= 2 (both endpoints), got {steps}")
    t = torch.linspace(0, 1, steps, dtype=a.dtype, device=a.device)
    return t.reshape(steps, *([1] * a.dim()))


def class_rows(num_classes: int, per_class: int, latent_dim: int,
               seed: int = 0) -> tuple[Tensor, Tensor]:
    """(z, y) for one row per class: (num_classes * per_class, L) and labels (same length).

    Column c of every row shares the same z, so a column shows one "style" across classes.
    """
    if num_classes < 1 or per_class < 1:
        raise ValueError(f"class_rows: need num_classes >= 1 and per_class >= 1, got"
                         f" {num_classes}, {per_class}")
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(per_class, latent_dim, generator=gen)
    return z.repeat(num_classes, 1), torch.arange(num_classes).repeat_interleave(per_class)


# --- decoded images --------------------------------------------------------------------------
def require_gaussian_latent(model, what: str) -> int:
    """The flat latent size of a model with a Gaussian posterior; ValueError otherwise."""
    shape = tuple(getattr(model, "latent_shape", ()))
    if getattr(model, "family", "") in ("vqvae", "crystal") or len(shape) != 1:
        raise ValueError(f"{what} needs a model with a flat Gaussian latent (mlp, conv, cvae-*);"
                         f" this {getattr(model, 'family', type(model).__name__)} model has"
                         f" latent shape {shape}")
    return shape[0]


def _device(model) -> torch.device:
    if isinstance(getattr(model, "device", None), torch.device):
        return model.device
    return next(model.parameters()).device


def _num_classes(model) -> int:
    return int(getattr(model, "num_classes", 0) or model.config.num_classes)


class RuntimeModel:
    """The slice of the model protocol used here, over an `engine.runtime.Sampler` (an exported
    artifact): decode, and encode when the export has an encoder part."""

    def __init__(self, sampler) -> None:
        spec = sampler.spec
        self.sampler, self.family = sampler, spec.family
        self.latent_shape, self.data_shape = tuple(spec.latent_shape), tuple(spec.output_shape)
        self.conditional, self.num_classes = spec.conditional, spec.num_classes
        self.device = torch.device("cpu")  # the sampler moves inputs to its own device

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        return self.sampler.decode(z.float(), y).cpu()

    def encode(self, x: Tensor, y: Tensor | None = None):
        out = self.sampler.encode(x, y)
        if not isinstance(out, tuple):
            raise ValueError(f"the {self.family} artifact's encoder gives codes, not a Gaussian")
        return DiagonalGaussian(out[0].float().cpu(), out[1].float().cpu())

    def reconstruct(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self.decode(self.encode(x, y).mean, y)


@torch.no_grad()
def decode_batched(model, z: Tensor, y: Tensor | None = None, batch: int = 1024) -> Tensor:
    out = []
    for s in range(0, z.shape[0], batch):
        yb = None if y is None else y[s:s + batch].to(_device(model))
        out.append(model.decode(z[s:s + batch].to(_device(model)), yb).cpu())
    return torch.cat(out)


@torch.no_grad()
def posterior_mean(model, x: Tensor, y: Tensor | None = None) -> Tensor:
    """E_q[z | x] for images x (B, C, H, W): (B, L)."""
    y = y.to(_device(model)) if y is not None and model.conditional else None
    return model.encode(x.to(_device(model)), y).mean.cpu()


def grid_images(model, dims=(0, 1), n: int = 15, lo: float = -3.0, hi: float = 3.0,
                y: Tensor | None = None) -> Tensor:
    z = latent_grid(require_gaussian_latent(model, "grid"), tuple(dims), n, lo, hi)
    return decode_batched(model, z, _labels(model, y, z.shape[0]))


def traverse_images(model, x: Tensor, y: Tensor | None = None, dims=None, k: float = 3.0,
                    steps: int = 9) -> Tensor:
    """x: one image (1, C, H, W); each row sweeps one dim of its posterior mean."""
    require_gaussian_latent(model, "traverse")
    z = traversal(posterior_mean(model, x, y)[0], dims, k, steps)
    return decode_batched(model, z, _labels(model, y, z.shape[0]))


def interpolate_images(model, x_a: Tensor, x_b: Tensor, steps: int = 10, method: str = "lerp",
                       y: Tensor | None = None) -> Tensor:
    """Decode the path between the posterior means of x_a and x_b (each (1, C, H, W))."""
    require_gaussian_latent(model, "interpolate")
    z_a, z_b = posterior_mean(model, x_a, y)[0], posterior_mean(model, x_b, y)[0]
    z = interpolate(z_a, z_b, steps, method)
    return decode_batched(model, z, _labels(model, y, steps))


def conditional_images(model, per_class: int = 10, seed: int = 0) -> Tensor:
    if not getattr(model, "conditional", False):
        raise ValueError(f"conditional sampling needs a conditional model (cvae-mlp, cvae-conv);"
                         f" this {getattr(model, 'family', '?')} model takes no labels")
    z, y = class_rows(_num_classes(model), per_class, require_gaussian_latent(
        model, "conditional"), seed)
    return decode_batched(model, z, y)


@torch.no_grad()
def reconstruct_images(model, x: Tensor, y: Tensor | None = None) -> Tensor:
    """Originals and reconstructions interleaved in pairs of rows: (2 B, C, H, W) for nrow=B."""
    y = y.to(_device(model)) if y is not None and model.conditional else None
    recon = model.reconstruct(x.to(_device(model)), y).cpu()
    return torch.cat([x.cpu(), recon])


def _labels(model, y: Tensor | None, n: int) -> Tensor | None:
    """A conditional model needs a label per latent: one given label, repeated (default 0)."""
    if not getattr(model, "conditional", False):
        return None
    label = int(y.reshape(-1)[0]) if y is not None else 0
    return torch.full((n,), label, dtype=torch.int64)


def load_latent_model(artifact: str | Path, backend: str | None = None, device: str | None = None,
                      compile: bool = False) -> tuple[Any, dict[str, Any]]:
    """(model, training config): the PyTorch model of a checkpoint/run directory, or an exported
    artifact behind engine.runtime.Sampler (as a RuntimeModel, with an empty config)."""
    path = Path(artifact)
    if not path.exists():
        raise ValueError(f"no artifact at {path}: expected a checkpoint/run directory, an export"
                         " directory or an .onnx/.pt2/.engine file")
    if path.is_dir() and not (path / "manifest.json").exists():
        model, c = ckpt.load_model(path, device=device or "cpu")
        return model, c.config.get("train", {})
    sampler = Sampler.load(path, backend=backend, device=device, compile=compile)
    return RuntimeModel(sampler), {}


def split_images(model, train_cfg: dict[str, Any], idx: list[int], split: str = "test",
                dataset: str | None = None, data_dir: str | None = None
                ) -> tuple[Tensor, Tensor]:
    """Images `idx` of a split, prepared as the model was trained: ((n, C, H, W), labels (n,))."""
    cfg = {**train_cfg, "dataset": dataset or train_cfg.get("dataset", "mnist")}
    cfg.setdefault("pad_to_32", tuple(getattr(model, "data_shape", (0,)))[-1:] == (32,))
    loader = split_loader(cfg, split, data_dir)
    n = loader.images.shape[0]
    if any(not 0 <= i < n for i in idx):
        raise ValueError(f"image indices {idx} out of range: the {split} split has {n}"
                         f" images (0..{n - 1})")
    i = torch.tensor(idx)
    return loader._prepare(loader.images[i]), loader.labels[i]


def label_tensor(model, label: int | None, y: Tensor | None = None) -> Tensor | None:
    """The (1,) label a conditional model decodes with: `label`, else y's first, else 0."""
    if not getattr(model, "conditional", False):
        if label is not None:
            raise ValueError("--label given, but this model is unconditional")
        return None
    label = label if label is not None else (int(y[0]) if y is not None else 0)
    if not 0 <= label < _num_classes(model):
        raise ValueError(f"--label must be in [0, {_num_classes(model)}), got {label}")
    return torch.tensor([label])
