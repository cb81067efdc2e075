"""Vector quantization (VQ-VAE). (Reference-only stage: the Triton path follows.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def vq_nearest_ref(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code (squared L2) for every row of x (..., D); int64 x.shape[:-1]."""
    acc = torch.promote_types(x.dtype, torch.float32)
    flat = x.reshape(-1, x.shape[-1]).to(acc)  # (N, D)
    e = codebook.to(acc)  # (K, D)
    dist = (e * e).sum(-1)[None, :] - 2.0 * flat @ e.t()  # (N, K), ||x||^2 dropped
    return dist.argmin(-1).reshape(x.shape[:-1])


def vq_quantize_ref(
    x: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference VQ: (quantized straight-through, indices, codebook + beta * commitment loss)."""
    idx = vq_nearest_ref(x, codebook)
    e = F.embedding(idx, codebook)  # (..., D), gradient flows to the codebook
    acc = torch.promote_types(x.dtype, torch.float32)
    codebook_loss = F.mse_loss(e.to(acc), x.detach().to(acc))
    commitment_loss = F.mse_loss(x.to(acc), e.detach().to(acc))
    quantized = e.detach() + (x - x.detach())  # value == codebook[idx], d/dx == identity
    return quantized, idx, codebook_loss + beta * commitment_loss


def vq_nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest-code indices; see vq_nearest_ref."""
    return vq_nearest_ref(x, codebook)


def vq_quantize(
    x: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize x to its nearest codes; see vq_quantize_ref."""
    return vq_quantize_ref(x, codebook, beta)
