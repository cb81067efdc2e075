"""Backward of the fused GroupNorm + SiLU (the math is in kernels/gn_silu.py):
    da = dy * s * (1 + a (1 - s)),  s = sigmoid(a),  a = gamma_c * xhat + beta_c
    dx = rstd * (da * gamma - mean_group(da * gamma) - xhat * mean_group(da * gamma * xhat))
    dgamma_c = sum over (n, hw) of da * xhat,   dbeta_c = sum over (n, hw) of da
Pass 1 sums da * xhat and da per channel (the group means follow: sum_c gamma_c * those / M);
pass 2 writes dx. Split groups (see kernels/_groups.py) run pass 1 in a stats kernel that writes
per-chunk sums, which each chunk's pass-2 program adds up. Per-channel sums go to an fp32
(N * S, 2, C) buffer that torch reduces over its first dim: deterministic, no atomics.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels._common import OpPair, jit, launch, next_pow2
from kernels._groups import Optional, Triple, flat_view, launch_params, like, offsets, param

tl: Any = None  # bound to triton.language on first launch (kernels._common.LazyJit)


@jit
def _silu_grad(dy_ptr, x_ptr, offs, mask, mean_hi, mean_lo, rstd, w, b):
    """(da, xhat) of one tile: da = dy * silu'(a), a = w * xhat + b (w, b per channel)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # 0 outside: da = 0
    xhat = tl.where(mask, ((x - mean_hi) - mean_lo) * rstd, 0.0)  # 0 off the tile
    a = xhat * w[:, None] + b[:, None]
    sig = tl.sigmoid(a)
    return dy * sig * (1.0 + a * (1.0 - sig)), xhat


@jit
def _chunk_grad_sums(dy_ptr, x_ptr, w_ptr, b_ptr, dwb_ptr, C, base, ch0, CPG, hw_lo, hw_hi,
                     mean_hi, mean_lo, rstd, stride_c, stride_hw,
                     BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):  # fmt: skip
    """Store per-channel sums of da * xhat (dwb_ptr[c]) and da (dwb_ptr[C + c]) over the chunk;
    return (sum of g, sum of g * xhat), g = da * gamma."""
    sum_g = tl.zeros((), dtype=tl.float32)
    sum_gx = tl.zeros((), dtype=tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < CPG
        w = tl.load(w_ptr + ch0 + c, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + ch0 + c, mask=cmask, other=0.0).to(tl.float32)
        dgamma = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)  # per lane, reduced after
        dbeta = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
        for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
            hw = hw0 + tl.arange(0, BLOCK_HW)
            mask = cmask[:, None] & (hw < hw_hi)[None, :]
            offs = offsets(base, c, hw, stride_c, stride_hw)
            da, xhat = _silu_grad(dy_ptr, x_ptr, offs, mask, mean_hi, mean_lo, rstd, w, b)
            dgamma += da * xhat
            dbeta += da
        dgamma_c, dbeta_c = tl.sum(dgamma, axis=1), tl.sum(dbeta, axis=1)  # (BLOCK_C,)
        tl.store(dwb_ptr + ch0 + c, dgamma_c, mask=cmask)
        tl.store(dwb_ptr + C + ch0 + c, dbeta_c, mask=cmask)
        sum_g += tl.sum(w * dbeta_c, axis=0)
        sum_gx += tl.sum(w * dgamma_c, axis=0)
    return sum_g, sum_gx


@jit
def _group_norm_silu_bwd_stats_kernel(
    dy_ptr,  # *T (N, C, HW) upstream gradient, x's strides
    x_ptr,  # *T (N, C, HW) input
    w_ptr, b_ptr,  # *T (C,) gamma, beta
    mean_ptr, rstd_ptr,  # *fp32 (2, N * G) mean as hi + lo, (N * G,) rstd: saved statistics
    dwb_ptr,  # *fp32 (N * S, 2, C) output per-chunk sums of da * xhat and da per channel
    part_ptr,  # *fp32 (N * G, 2, S) output per-chunk (sum g, sum g * xhat)
    G, CPG, HW, CHUNK, S,  # as the forward
    stride_n, stride_c, stride_hw,  # element strides of the (N, C, HW) view
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,  # tile: channels x pixels
):  # fmt: skip
    ng, s = tl.program_id(0), tl.program_id(1)
    n, g = ng // G, ng % G
    base = n.to(tl.int64) * stride_n + g.to(tl.int64) * CPG * stride_c
    C = G * CPG
    hw_lo = s * CHUNK
    sum_g, sum_gx = _chunk_grad_sums(
        dy_ptr, x_ptr, w_ptr, b_ptr, dwb_ptr + (n.to(tl.int64) * S + s) * 2 * C, C, base,
        g * CPG, CPG, hw_lo, tl.minimum(hw_lo + CHUNK, HW), tl.load(mean_ptr + ng),
        tl.load(mean_ptr + tl.num_programs(0) + ng), tl.load(rstd_ptr + ng), stride_c, stride_hw,
        BLOCK_C, BLOCK_HW,
    )  # fmt: skip
    row = part_ptr + ng.to(tl.int64) * 2 * S
    tl.store(row + s, sum_g)
    tl.store(row + S + s, sum_gx)


@jit
def _group_norm_silu_bwd_kernel(
    dy_ptr,  # *T (N, C, HW) upstream gradient, x's strides
    x_ptr,  # *T (N, C, HW) input
    w_ptr, b_ptr,  # *T (C,) gamma, beta
    mean_ptr, rstd_ptr,  # *fp32 (2, N * G) mean as hi + lo, (N * G,) rstd: saved statistics
    dx_ptr,  # *T (N, C, HW) output dL/dx, x's strides
    dwb_ptr,  # *fp32 (N, 2, C) output per-channel sums (not SPLIT; the stats kernel's if SPLIT)
    part_ptr,  # *fp32 (N * G, 2, S) per-chunk sums of the stats kernel (SPLIT only)
    G, CPG, HW, CHUNK, S,  # as the forward
    stride_n, stride_c, stride_hw,  # element strides of the (N, C, HW) view
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,  # tile: channels x pixels
    BLOCK_S: tl.constexpr,  # next power of two >= S
    SPLIT: tl.constexpr,  # sum S partials (else: this program's sums over the group)
):  # fmt: skip
    ng, s = tl.program_id(0), tl.program_id(1)
    n, g = ng // G, ng % G
    base = n.to(tl.int64) * stride_n + g.to(tl.int64) * CPG * stride_c
    mean_hi, rstd = tl.load(mean_ptr + ng), tl.load(rstd_ptr + ng)
    mean_lo = tl.load(mean_ptr + tl.num_programs(0) + ng)
    if SPLIT:
        i = tl.arange(0, BLOCK_S)
        row = part_ptr + ng.to(tl.int64) * 2 * S
        sum_g = tl.sum(tl.load(row + i, mask=i < S, other=0.0), axis=0)
        sum_gx = tl.sum(tl.load(row + S + i, mask=i < S, other=0.0), axis=0)
    else:
        sum_g, sum_gx = _chunk_grad_sums(
            dy_ptr, x_ptr, w_ptr, b_ptr, dwb_ptr + n.to(tl.int64) * 2 * G * CPG, G * CPG, base,
            g * CPG, CPG, 0, HW, mean_hi, mean_lo, rstd, stride_c, stride_hw, BLOCK_C, BLOCK_HW,
        )  # fmt: skip
    numel = (tl.zeros((), dtype=tl.float32) + CPG) * HW
    mean_g, mean_gx = sum_g / numel, sum_gx / numel
    hw_lo = s * CHUNK
    hw_hi = tl.minimum(hw_lo + CHUNK, HW)
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < CPG
        w = tl.load(w_ptr + g * CPG + c, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + g * CPG + c, mask=cmask, other=0.0).to(tl.float32)
        for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
            hw = hw0 + tl.arange(0, BLOCK_HW)
            mask = cmask[:, None] & (hw < hw_hi)[None, :]
            offs = offsets(base, c, hw, stride_c, stride_hw)
            da, xhat = _silu_grad(dy_ptr, x_ptr, offs, mask, mean_hi, mean_lo, rstd, w, b)
            dx = rstd * (da * w[:, None] - mean_g - xhat * mean_gx)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _bwd_impl(dy: torch.Tensor, x: torch.Tensor, weight: Optional, bias: Optional,
              mean: torch.Tensor, rstd: torch.Tensor, num_groups: int) -> Triple:  # fmt: skip
    groups, cpg, hw, strides = flat_view(x, num_groups)
    dy, dx = like(dy, x), torch.empty_like(x)
    n, c = x.shape[:2]
    if x.numel() == 0:
        return dx, x.new_zeros(c), x.new_zeros(c)
    p = launch_params(groups, cpg, hw, x.device)
    dwb = torch.empty(n * p.splits, 2, c, dtype=torch.float32, device=x.device)
    part = torch.empty(groups, 2, p.splits, dtype=torch.float32, device=x.device)
    params = (param(weight, x, 1.0), param(bias, x, 0.0), mean, rstd)
    sizes = (num_groups, cpg, hw, p.chunk, p.splits)
    if p.splits > 1:
        launch(_group_norm_silu_bwd_stats_kernel, (groups, p.splits), dy, x, *params, dwb, part,
               *sizes, *strides, **p.blocks())  # fmt: skip
    launch(_group_norm_silu_bwd_kernel, (groups, p.splits), dy, x, *params, dx, dwb, part,
           *sizes, *strides, **p.blocks(), BLOCK_S=next_pow2(p.splits),
           SPLIT=p.splits > 1)  # fmt: skip
    dgamma, dbeta = (dwb[:, i].sum(0).to(x.dtype) for i in (0, 1))  # (C,) each, not aliased
    return dx, dgamma, dbeta


def _bwd_fake(dy: torch.Tensor, x: torch.Tensor, weight: Optional, bias: Optional,
              mean: torch.Tensor, rstd: torch.Tensor, num_groups: int) -> Triple:  # fmt: skip
    return torch.empty_like(x), x.new_empty(x.shape[1]), x.new_empty(x.shape[1])


_BWD = OpPair(
    "group_norm_silu_bwd", _bwd_impl, _bwd_fake,
    "(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
    "int num_groups) -> (Tensor, Tensor, Tensor)",
)  # fmt: skip
