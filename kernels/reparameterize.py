"""Reparameterized Gaussian sample z = mu + exp(0.5 * logvar) * eps, eps ~ N(0, I).

(Reference-only stage: the Triton path follows.)
"""

from __future__ import annotations

import torch


def _ref_noise(mu: torch.Tensor, seed: int | None) -> torch.Tensor:
    if seed is None:
        return torch.randn_like(mu)
    gen = torch.Generator(device=mu.device)
    gen.manual_seed(int(seed))
    return torch.randn(mu.shape, generator=gen, device=mu.device, dtype=mu.dtype)


def reparameterize_ref(
    mu: torch.Tensor, logvar: torch.Tensor, seed: int | None = None
) -> torch.Tensor:
    """Pure-PyTorch reparameterization; eps from a torch.Generator seeded by `seed`."""
    eps = _ref_noise(mu, seed)
    return mu + torch.exp(0.5 * logvar) * eps


def reparameterize(
    mu: torch.Tensor, logvar: torch.Tensor, seed: int | None = None
) -> torch.Tensor:
    """Sample z = mu + exp(0.5 * logvar) * eps with eps ~ N(0, I), same shape as mu."""
    return reparameterize_ref(mu, logvar, seed)
