"""Fused GroupNorm + SiLU (GroupNorm: Wu & He 2018, arXiv:1803.08494; SiLU: Elfwing et al. 2017,
arXiv:1702.03118), the norm -> activation pair that opens every ResNet block of a latent-diffusion
VAE decoder.

Forward, x (N, C, *spatial) viewed as (N, G, C/G, HW); group (n, g) holds M = C/G * HW elements:
    mu_g   = mean of x over the group,   var_g = mean of (x - mu_g)^2   (biased, as torch)
    rstd_g = 1 / sqrt(var_g + eps),      xhat  = (x - mu_g) * rstd_g
    a      = gamma_c * xhat + beta_c,    y     = silu(a) = a * sigmoid(a)
mean and rstd (float32) are saved for the backward; xhat and a are recomputed there. The
statistics are taken of x - pivot (pivot: the group's first element) and the mean is kept as two
floats, mean = hi + lo with hi = fp32(mean), so x - mean = (x - hi) - lo stays exact to fp32
even when the mean is large against the spread.
Backward, upstream gradient dy, s = sigmoid(a) (silu'(a) = s + a s (1 - s)):
    da       = dy * s * (1 + a (1 - s)),   g = da * gamma_c
    dx       = rstd_g * (g - mean_group(g) - xhat * mean_group(g * xhat))
    dgamma_c = sum over (n, hw) of da * xhat,   dbeta_c = sum over (n, hw) of da
The group means come from the per-channel sums of the first pass:
    mean_group(g) = sum_c gamma_c dbeta_nc / M,   mean_group(g xhat) = sum_c gamma_c dgamma_nc / M
so the backward reads the group twice: per-channel sums, then dx.

Programs: one per (n, g) with a loop over (BLOCK_C channels x BLOCK_HW pixels) tiles:
statistics first (Welford's update in every lane of the tile, the lanes merged at the end with
Chan et al.'s parallel-variance formula: no E[x^2] - E[x]^2 cancellation for inputs with a large
mean), then the normalise + SiLU loop. With few groups and big feature maps (an SD decoder at
batch 1: 32 groups of 16 x 128 x 128 = 262k elements for 132 SMs on an H200) each group's pixels
are split into S chunks: a stats kernel writes per-chunk (mean, M2), and each chunk's program
merges the S partials before normalising its chunk. The backward splits the same way with
per-chunk sums (kernels/gn_silu_bwd.py). `kernels._groups.launch_params` chooses S from the
number of SMs (`kernels._groups.TUNING`).

Memory traffic per element (s = bytes of the dtype): forward reads x twice and writes y, 3s (the
second read of a group usually hits L2); eager GroupNorm then SiLU moves about 5s. Backward reads
dy and x twice each and writes dx, 5s, plus N * S * C * 8 bytes of per-channel partials; eager
SiLU backward then GroupNorm backward moves about 8s.

Limits: float16 / bfloat16 / float32 storage, float32 arithmetic; float64 runs the reference
(under the "triton" backend it raises TypeError). x contiguous (NCHW) or channels-last (channels
innermost: NHWC, NDHWC, NLC); other strides are copied to contiguous first; y and dx keep x's
layout. weight / bias: (C,) of x's dtype, or None. Groups of any size (int64 offsets; chunk
statistics in float32). While torch.export traces (ONNX, AOTInductor) the reference is used, so
exported graphs hold aten group_norm + silu.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kernels import dispatch
from kernels._common import OpPair, check_float, jit, launch, next_pow2
from kernels._groups import (
    Optional,
    Triple,
    channels_last,
    flat_view,
    launch_params,
    offsets,
    param,
)
from kernels.gn_silu_bwd import _BWD

tl: Any = None  # bound to triton.language on first launch (kernels._common.LazyJit)

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@jit
def _welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Merge two (mean, M2, count) triples (Chan et al. 1979); empty ones (count 0) vanish."""
    n = n_a + n_b
    w_b = tl.where(n == 0.0, 0.0, n_b / tl.maximum(n, 1.0))
    delta = mean_b - mean_a
    return mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b, n


@jit
def _chunk_stats(x_ptr, base, pivot, CPG, hw_lo, hw_hi, stride_c, stride_hw,
                 BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):  # fmt: skip
    """(mean of x - pivot, M2 = sum (x - mean)^2) over channels [0, CPG) x pixels [hw_lo, hw_hi)
    of a group; pivot is an element of the group, so the shifted values are of the spread's size.

    Every lane of the (BLOCK_C, BLOCK_HW) tile runs Welford's update over the loop (no
    cross-thread reduction inside the loop); the lanes are merged once at the end."""
    mean = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    count = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
            hw = hw0 + tl.arange(0, BLOCK_HW)
            mask = (c < CPG)[:, None] & (hw < hw_hi)[None, :]
            x = tl.load(x_ptr + offsets(base, c, hw, stride_c, stride_hw), mask=mask, other=0.0)
            x = x.to(tl.float32) - pivot
            count += mask.to(tl.float32)
            delta = tl.where(mask, x - mean, 0.0)
            mean += delta / tl.maximum(count, 1.0)
            m2 += delta * tl.where(mask, x - mean, 0.0)
    mean, m2, count = tl.reduce((mean, m2, count), 1, _welford_combine)  # (BLOCK_C,)
    mean, m2, count = tl.reduce((mean, m2, count), 0, _welford_combine)
    return mean, m2


@jit
def _merge_partials(part_ptr, ng, S, CHUNK, HW, CPG, BLOCK_S: tl.constexpr):
    """Group (mean, M2) from the S chunk partials part[ng, 0, :] (means), part[ng, 1, :] (M2)
    (means of x - pivot, the same pivot for every chunk)."""
    i = tl.arange(0, BLOCK_S)
    valid = i < S
    row = part_ptr + ng.to(tl.int64) * 2 * S
    means = tl.load(row + i, mask=valid, other=0.0)
    m2s = tl.load(row + S + i, mask=valid, other=0.0)
    counts = tl.where(valid, tl.minimum(HW - i * CHUNK, CHUNK), 0).to(tl.float32) * CPG
    mean, m2, _ = tl.reduce((means, m2s, counts), 0, _welford_combine)
    return mean, m2


@jit
def _two_sum(a, b):
    """(hi, lo) with hi = fl(a + b) and hi + lo = a + b exactly (Knuth's TwoSum)."""
    hi = a + b
    b_part = hi - a
    return hi, (a - (hi - b_part)) + (b - b_part)


@jit
def _normalize_chunk(x_ptr, y_ptr, w_ptr, b_ptr, base, ch0, CPG, hw_lo, hw_hi, mean_hi, mean_lo,
                     rstd, stride_c, stride_hw,
                     BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):  # fmt: skip
    """y = silu(gamma * (x - mean) * rstd + beta) on channels ch0 + [0, CPG), pixels [lo, hi);
    mean = mean_hi + mean_lo."""
    for c0 in range(0, CPG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < CPG
        scale = tl.load(w_ptr + ch0 + c, mask=cmask, other=0.0).to(tl.float32) * rstd
        shift = tl.load(b_ptr + ch0 + c, mask=cmask, other=0.0).to(tl.float32)
        for hw0 in range(hw_lo, hw_hi, BLOCK_HW):
            hw = hw0 + tl.arange(0, BLOCK_HW)
            mask = cmask[:, None] & (hw < hw_hi)[None, :]
            offs = offsets(base, c, hw, stride_c, stride_hw)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            xc = tl.where(mask, (x - mean_hi) - mean_lo, 0.0)  # exact near the mean; 0 off tile
            a = xc * scale[:, None] + shift[:, None]  # (BLOCK_C, BLOCK_HW)
            tl.store(y_ptr + offs, (a * tl.sigmoid(a)).to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _group_norm_silu_fwd_stats_kernel(
    x_ptr,  # *T (N, C, HW) input, strides below
    part_ptr,  # *fp32 (N * G, 2, S) output per-chunk (mean of x - pivot, M2)
    G, CPG, HW,  # groups, channels per group, pixels per channel
    CHUNK, S,  # pixels per chunk, chunks per group (grid axis 1)
    stride_n, stride_c, stride_hw,  # element strides of the (N, C, HW) view
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,  # tile: channels x pixels
):  # fmt: skip
    ng, s = tl.program_id(0), tl.program_id(1)
    base = (ng // G).to(tl.int64) * stride_n + (ng % G).to(tl.int64) * CPG * stride_c
    hw_lo = s * CHUNK
    pivot = tl.load(x_ptr + base).to(tl.float32)  # the group's first element, for every chunk
    mean, m2 = _chunk_stats(x_ptr, base, pivot, CPG, hw_lo, tl.minimum(hw_lo + CHUNK, HW),
                            stride_c, stride_hw, BLOCK_C, BLOCK_HW)  # fmt: skip
    row = part_ptr + ng.to(tl.int64) * 2 * S
    tl.store(row + s, mean)
    tl.store(row + S + s, m2)


@jit
def _group_norm_silu_fwd_kernel(
    x_ptr,  # *T (N, C, HW) input
    w_ptr,  # *T (C,) gamma
    b_ptr,  # *T (C,) beta
    y_ptr,  # *T (N, C, HW) output, x's strides
    mean_ptr,  # *fp32 (2, N * G) output group means as hi + lo (hi = fp32(mean))
    rstd_ptr,  # *fp32 (N * G,) output 1 / sqrt(var + eps)
    part_ptr,  # *fp32 (N * G, 2, S) chunk partials of the stats kernel (SPLIT only)
    G, CPG, HW,  # groups, channels per group, pixels per channel
    CHUNK, S,  # pixels per chunk, chunks per group (grid axis 1)
    eps,  # variance epsilon
    stride_n, stride_c, stride_hw,  # element strides of the (N, C, HW) view of x and y
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,  # tile: channels x pixels
    BLOCK_S: tl.constexpr,  # next power of two >= S
    SPLIT: tl.constexpr,  # merge S partials (else: this program's statistics over the group)
):  # fmt: skip
    ng, s = tl.program_id(0), tl.program_id(1)
    g = ng % G
    base = (ng // G).to(tl.int64) * stride_n + g.to(tl.int64) * CPG * stride_c
    pivot = tl.load(x_ptr + base).to(tl.float32)  # statistics of x - pivot: no large-mean error
    if SPLIT:
        shifted, m2 = _merge_partials(part_ptr, ng, S, CHUNK, HW, CPG, BLOCK_S)
    else:
        shifted, m2 = _chunk_stats(x_ptr, base, pivot, CPG, 0, HW, stride_c, stride_hw,
                                   BLOCK_C, BLOCK_HW)  # fmt: skip
    numel = (tl.zeros((), dtype=tl.float32) + CPG) * HW  # float: no int32 overflow
    rstd = 1.0 / tl.sqrt(m2 / numel + eps)
    mean_hi, mean_lo = _two_sum(pivot, shifted)
    tl.store(mean_ptr + ng, mean_hi, mask=s == 0)
    tl.store(mean_ptr + tl.num_programs(0) + ng, mean_lo, mask=s == 0)
    tl.store(rstd_ptr + ng, rstd, mask=s == 0)
    hw_lo = s * CHUNK
    _normalize_chunk(x_ptr, y_ptr, w_ptr, b_ptr, base, g * CPG, CPG, hw_lo,
                     tl.minimum(hw_lo + CHUNK, HW), mean_hi, mean_lo, rstd, stride_c, stride_hw,
                     BLOCK_C, BLOCK_HW)  # fmt: skip


def _fwd_impl(
    x: torch.Tensor, weight: Optional, bias: Optional, num_groups: int, eps: float
) -> Triple:
    groups, cpg, hw, strides = flat_view(x, num_groups)
    y = torch.empty_like(x)  # x's layout (x is dense)
    mean = torch.empty(2, x.shape[0], num_groups, dtype=torch.float32, device=x.device)  # hi, lo
    rstd = torch.empty_like(mean[0])
    if x.numel() == 0:
        return y, mean, rstd
    p = launch_params(groups, cpg, hw, x.device)
    part = torch.empty(groups, 2, p.splits, dtype=torch.float32, device=x.device)
    sizes = (num_groups, cpg, hw, p.chunk, p.splits)
    if p.splits > 1:
        launch(_group_norm_silu_fwd_stats_kernel, (groups, p.splits), x, part, *sizes, *strides,
               **p.blocks())  # fmt: skip
    launch(_group_norm_silu_fwd_kernel, (groups, p.splits), x, param(weight, x, 1.0),
           param(bias, x, 0.0), y, mean, rstd, part, *sizes, eps, *strides, **p.blocks(),
           BLOCK_S=next_pow2(p.splits), SPLIT=p.splits > 1)  # fmt: skip
    return y, mean, rstd


def _fwd_fake(
    x: torch.Tensor, weight: Optional, bias: Optional, num_groups: int, eps: float
) -> Triple:
    rstd = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x), x.new_empty((2, *rstd.shape), dtype=torch.float32), rstd


# ----------------------------------------------------------------------------------------------
# Registration, public function, reference
# ----------------------------------------------------------------------------------------------
_FWD = OpPair(
    "group_norm_silu_fwd", _fwd_impl, _fwd_fake,
    "(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps) "
    "-> (Tensor, Tensor, Tensor)",
)  # fmt: skip


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight, bias, num_groups, _ = inputs
    ctx.num_groups = num_groups
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(x, weight, bias, output[1], output[2])


def _backward(ctx: Any, dy: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dgamma, dbeta = _BWD(dy, x, weight, bias, mean, rstd, ctx.num_groups)
    need = ctx.needs_input_grad
    return dx, (dgamma if need[1] else None), (dbeta if need[2] else None), None, None


_FWD.register_autograd(_backward, _setup_context)


def _check(x: Any, num_groups: Any, weight: Any, bias: Any, eps: Any) -> None:
    op = "group_norm_silu"
    check_float(op, "x", x)
    if x.dim() < 2:
        raise ValueError(f"{op}(): expected x of shape (N, C, *spatial), got {tuple(x.shape)}")
    c = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"{op}(): expected num_groups as an int >= 1, got {num_groups!r}")
    if c % num_groups:
        raise ValueError(f"{op}(): expected C divisible by num_groups, got C={c} and "
                         f"num_groups={num_groups}: use a divisor of {c}")  # fmt: skip
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"{op}(): expected eps as a finite float >= 0, got {eps!r}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_float(op, name, p)
        if tuple(p.shape) != (c,):
            raise ValueError(f"{op}(): expected {name} of shape (C,) = ({c},), got "
                             f"{tuple(p.shape)}")  # fmt: skip
        if p.dtype != x.dtype:
            raise TypeError(f"{op}(): expected {name} of x's dtype {x.dtype}, got {p.dtype}: "
                            f"cast the module, e.g. norm.to({x.dtype})")  # fmt: skip
        if p.device != x.device:
            raise ValueError(f"{op}(): x is on {x.device} but {name} is on {p.device}")


def _triton_ok(x: torch.Tensor) -> bool:
    """Dispatch; the reference while exporting, for empty x, and for float64 under "auto"."""
    if torch.compiler.is_exporting() or dispatch.resolve(x) == "torch" or x.numel() == 0:
        return False
    if x.dtype in KERNEL_DTYPES:
        return True
    if dispatch.get_backend() == "triton":
        raise TypeError(f"group_norm_silu(): the Triton kernels take float16, bfloat16 or "
                        f"float32, got {x.dtype}: use set_backend('torch') or cast x")  # fmt: skip
    return False


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """silu(group_norm(x)) in one fused op: the GroupNorm -> SiLU pair of VAE ResNet blocks.

    Call it with an nn.GroupNorm's settings:
        kernels.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps)

    Args:
        x: (N, C, *spatial) activations (e.g. (N, C, H, W)), float16 / bfloat16 / float32
            (float64 runs the reference); contiguous or channels-last, other layouts are copied.
        num_groups: G, a divisor of C; statistics are taken over C/G channels x all pixels.
        weight: per-channel scale gamma (C,) of x's dtype, or None (ones).
        bias: per-channel shift beta (C,) of x's dtype, or None (zeros).
        eps: added to the variance before the square root.

    Returns:
        y of x's shape and dtype, in x's memory layout (contiguous if x was neither contiguous
        nor channels-last). Differentiable in x, weight and bias.
    """
    _check(x, num_groups, weight, bias, eps)
    if not _triton_ok(x):
        return group_norm_silu_ref(x, num_groups, weight, bias, eps)
    if not (x.is_contiguous() or channels_last(x)):
        x = x.contiguous()  # the kernels read contiguous or channels-last strides only
    return _FWD(x, weight, bias, num_groups, float(eps))[0]


def group_norm_silu_ref(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Pure-PyTorch reference: F.group_norm then F.silu (exports as GroupNormalization + Silu)."""
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))
