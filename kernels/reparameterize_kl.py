"""Fused reparameterization + per-row KL. (Reference-only stage: the Triton path follows.)"""

from __future__ import annotations

import torch

from kernels.kl_divergence import kl_divergence_ref
from kernels.reparameterize import reparameterize_ref


def reparameterize_kl_ref(
    mu: torch.Tensor, logvar: torch.Tensor, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (reparameterize_ref(mu, logvar, seed), kl_divergence_ref(mu, logvar))."""
    return reparameterize_ref(mu, logvar, seed), kl_divergence_ref(mu, logvar)


def reparameterize_kl(
    mu: torch.Tensor, logvar: torch.Tensor, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (z, kl) with z like mu and kl per row (shape mu.shape[:-1], float32)."""
    return reparameterize_kl_ref(mu, logvar, seed)
