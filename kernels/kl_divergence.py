"""KL(N(mu, exp(logvar)) || N(0, I)) per row. (Reference-only stage: the Triton path follows.)"""

from __future__ import annotations

import torch

REDUCTIONS = ("none", "sum", "mean", "batchmean")


def _reduce(kl_rows: torch.Tensor, reduction: str, row_size: int) -> torch.Tensor:
    if reduction == "none":
        return kl_rows
    total = kl_rows.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(1, kl_rows.numel() * row_size)
    if reduction == "batchmean":
        return total / max(1, kl_rows.numel())
    raise ValueError(f"unknown reduction {reduction!r}: expected one of {', '.join(REDUCTIONS)}")


def kl_divergence_ref(
    mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "none"
) -> torch.Tensor:
    """Pure-PyTorch KL divergence over the last dim, computed in at least float32."""
    acc = torch.promote_types(mu.dtype, torch.float32)
    mu, logvar = mu.to(acc), logvar.to(acc)
    kl_rows = -0.5 * (1 + logvar - mu * mu - torch.exp(logvar)).sum(-1)
    return _reduce(kl_rows, reduction, mu.shape[-1])


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """KL divergence to N(0, I) over the last dim; see kl_divergence_ref."""
    return kl_divergence_ref(mu, logvar, reduction)
