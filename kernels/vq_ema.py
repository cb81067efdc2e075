"""Per-code counts and sums of assigned vectors, the statistics of EMA codebook updates
(VQ-VAE appendix A.1, arXiv:1711.00937; as in vector-quantize-pytorch's EuclideanCodebook).

For x viewed as (N, D) rows, indices (N,) and K codes:
    counts[k] = #{i : idx_i = k}                   (K,)   float32
    sums[k]   = sum_{i : idx_i = k} x_i            (K, D) float32
Indices outside [0, K) are ignored. The caller does the EMA itself, e.g.
    N_k <- decay N_k + (1 - decay) counts_k;  m_k <- decay m_k + (1 - decay) sums_k;
    e_k  = m_k / (Laplace-smoothed N_k).
Not differentiable (EMA statistics are taken under no_grad).

Memory traffic: reads x (N*D*s) and the indices (8N); writes through fp32 atomics, N*(D + 1)
atomic adds landing on K*(D + 1) floats. Sums are in fp32 whatever the input dtype; the order of
the atomic adds is not deterministic, so sums may differ in the last bits between runs.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels import dispatch
from kernels._common import OpPair, cdiv, check_float, jit, launch, next_pow2

tl: Any = None  # bound to triton.language on first launch (kernels._common.LazyJit)


@jit
def _vq_ema_update_fwd_kernel(
    x_ptr,  # *T (N, D) assigned vectors
    idx_ptr,  # *int64 (N,) code of every row
    counts_ptr,  # *fp32 (K,) zeroed output counts
    sums_ptr,  # *fp32 (K, D) contiguous zeroed output sums
    N, K, D,  # rows, codes, dim
    stride_xn, stride_xd,  # strides of x
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # columns per loop step
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    idx = tl.load(idx_ptr + rows, mask=rows < N, other=-1)
    valid = (rows < N) & (idx >= 0) & (idx < K)
    ones = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    tl.atomic_add(counts_ptr + idx, ones, mask=valid)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)  # (BLOCK_D,)
        mask = valid[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd,
                    mask=mask, other=0.0).to(tl.float32)  # fmt: skip
        tl.atomic_add(sums_ptr + idx[:, None] * D + cols[None, :], x, mask=mask)


def _launch_params(dim: int) -> dict[str, int]:
    """Tiles of about 4096 elements; whole rows when D <= 256."""
    block_d = min(256, max(16, next_pow2(dim)))
    return {"BLOCK_N": max(16, 4096 // block_d), "BLOCK_D": block_d, "num_warps": 4}


def _fwd_impl(x: torch.Tensor, indices: torch.Tensor, num_codes: int
              ) -> tuple[torch.Tensor, torch.Tensor]:  # a fixed arity: torch 2.11 infers the schema
    N, D = x.shape
    counts = torch.zeros(num_codes, dtype=torch.float32, device=x.device)
    sums = torch.zeros(num_codes, D, dtype=torch.float32, device=x.device)
    if N > 0:
        p = _launch_params(D)
        launch(_vq_ema_update_fwd_kernel, (cdiv(N, p["BLOCK_N"]),), x, indices.contiguous(),
               counts, sums, N, num_codes, D, x.stride(0), x.stride(1), **p)  # fmt: skip
    return counts, sums


def _fwd_fake(x: torch.Tensor, indices: torch.Tensor, num_codes: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    counts = x.new_empty(num_codes, dtype=torch.float32)
    return counts, x.new_empty((num_codes, x.shape[1]), dtype=torch.float32)


_FWD = OpPair(
    "vq_ema_update", _fwd_impl, _fwd_fake,
    "(Tensor x, Tensor indices, SymInt num_codes) -> (Tensor, Tensor)",
)  # fmt: skip


def _check(x: torch.Tensor, indices: torch.Tensor, num_codes: int) -> None:
    check_float("vq_ema_update", "x", x)
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64:
        found = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise TypeError(f"vq_ema_update(): expected int64 indices, got {found}")
    if indices.shape != x.shape[:-1]:
        raise ValueError(
            f"vq_ema_update(): expected indices of shape x.shape[:-1] = {tuple(x.shape[:-1])}, "
            f"got {tuple(indices.shape)}"
        )
    if isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"vq_ema_update(): expected num_codes as an int >= 1, got {num_codes!r}")
    if indices.device != x.device:
        raise ValueError(f"vq_ema_update(): x is on {x.device}, indices on {indices.device}")


def vq_ema_update(
    x: torch.Tensor, indices: torch.Tensor, num_codes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code counts and sums of the vectors assigned to each code.

    Args:
        x: vectors (..., D), float16 / bfloat16 / float32 / float64 (detached).
        indices: int64 codes of shape x.shape[:-1], e.g. from `vq_quantize`.
        num_codes: K, the codebook size.

    Returns:
        (counts (K,), sums (K, D)), both float32. Indices outside [0, K) are ignored.
    """
    _check(x, indices, num_codes)
    x, indices = x.detach(), indices.reshape(-1)
    if dispatch.resolve(x) == "torch":
        return vq_ema_update_ref(x, indices, num_codes)
    return _FWD(x.reshape(-1, x.shape[-1]), indices, num_codes)


def vq_ema_update_ref(
    x: torch.Tensor, indices: torch.Tensor, num_codes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference with index_add_; indices outside [0, num_codes) are ignored."""
    flat = x.reshape(-1, x.shape[-1]).float()  # (N, D)
    idx = indices.reshape(-1)
    valid = ((idx >= 0) & (idx < num_codes)).to(torch.float32)  # (N,)
    idx = idx.clamp(0, max(num_codes - 1, 0))
    counts = torch.zeros(num_codes, dtype=torch.float32, device=x.device).index_add_(0, idx, valid)
    sums = torch.zeros(num_codes, flat.shape[1], dtype=torch.float32, device=x.device)
    return counts, sums.index_add_(0, idx, flat * valid[:, None])
