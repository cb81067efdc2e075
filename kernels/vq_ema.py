"""Per-code counts and sums for EMA codebook updates. (Reference-only stage.)"""

from __future__ import annotations

import torch


def vq_ema_update_ref(
    x: torch.Tensor, indices: torch.Tensor, num_codes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """counts[k] = #{i: idx_i = k}, sums[k] = sum_{i: idx_i = k} x_i (float32).

    Indices outside [0, num_codes) are ignored.
    """
    flat = x.reshape(-1, x.shape[-1]).float()  # (N, D)
    idx = indices.reshape(-1)
    valid = ((idx >= 0) & (idx < num_codes)).to(torch.float32)  # (N,)
    idx = idx.clamp(0, max(num_codes - 1, 0))
    counts = torch.zeros(num_codes, dtype=torch.float32, device=x.device).index_add_(0, idx, valid)
    sums = torch.zeros(num_codes, flat.shape[1], dtype=torch.float32, device=x.device)
    return counts, sums.index_add_(0, idx, flat * valid[:, None])


def vq_ema_update(
    x: torch.Tensor, indices: torch.Tensor, num_codes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code counts (K,) and sums (K, D) in float32; see vq_ema_update_ref."""
    return vq_ema_update_ref(x, indices, num_codes)
