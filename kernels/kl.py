"""KL(N(mu, diag(exp(logvar))) || N(0, I)) per row, with a fused backward.

Forward, for rows r of the (R, D) view of the inputs (R = prod(shape[:-1])):
    kl[r] = -0.5 * sum_d (1 + logvar[r, d] - mu[r, d]^2 - exp(logvar[r, d]))
then a reduction in torch: "none" (R rows, shape[:-1]), "sum", "mean" = sum / (R * D)
(mean over all elements, torch's KLDivLoss convention) or "batchmean" = sum / R (mean over rows).
Backward, elementwise with the per-row upstream gradient g[r]:
    dmu[r, d]     = g[r] * mu[r, d]
    dlogvar[r, d] = g[r] * 0.5 * (exp(logvar[r, d]) - 1)

Memory traffic per element (s = bytes of the dtype): forward reads mu and logvar, 2s (plus 4 bytes
per row); backward reads mu and logvar and writes dmu and dlogvar, 4s.
Accumulation in fp32 (fp64 for float64 inputs); kl is returned in float32 (float64 for float64
inputs) because a sum over D of exp(logvar) overflows half precision quickly.
Limits: same shape, dtype and device for mu and logvar; any strides along the (R, D) view
(non-viewable layouts are copied). fp16 gradients overflow where exp(logvar) > 65504.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels import dispatch
from kernels._common import OpPair, cdiv, check_pair, jit, launch, next_pow2

tl: Any = None  # bound to triton.language on first launch (kernels._common.LazyJit)

REDUCTIONS = ("none", "sum", "mean", "batchmean")


@jit
def _load_rows(mu_ptr, logvar_ptr, rows, cols, mask, stride_mr, stride_md, stride_lr, stride_ld,
               IS_FP64: tl.constexpr):  # fmt: skip
    """One (BLOCK_R, BLOCK_D) tile of mu and logvar, strided, in the accumulation dtype."""
    acc_t = tl.float64 if IS_FP64 else tl.float32
    mu = tl.load(mu_ptr + rows[:, None] * stride_mr + cols[None, :] * stride_md,
                 mask=mask, other=0.0).to(acc_t)  # fmt: skip
    lv = tl.load(logvar_ptr + rows[:, None] * stride_lr + cols[None, :] * stride_ld,
                 mask=mask, other=0.0).to(acc_t)  # fmt: skip
    return mu, lv


@jit
def _kl_row_terms(mu, lv, mask):
    """Per-row partial sums of 1 + logvar - mu^2 - exp(logvar) over a tile: (BLOCK_R,)."""
    return tl.sum(tl.where(mask, 1.0 + lv - mu * mu - tl.exp(lv), 0.0), axis=1)


@jit
def _kl_divergence_fwd_kernel(
    mu_ptr,  # *T (R, D) means
    logvar_ptr,  # *T (R, D) log-variances
    kl_ptr,  # *ACC (R,) output per-row KL
    R,  # rows
    D,  # latent dim
    stride_mr, stride_md,  # strides of mu (elements)
    stride_lr, stride_ld,  # strides of logvar
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # columns per loop step
    IS_FP64: tl.constexpr,  # accumulate in fp64 instead of fp32
):  # fmt: skip
    acc_t = tl.float64 if IS_FP64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    row_mask = rows < R
    acc = tl.zeros((BLOCK_R,), dtype=acc_t)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)  # (BLOCK_D,)
        mask = row_mask[:, None] & (cols < D)[None, :]
        mu, lv = _load_rows(mu_ptr, logvar_ptr, rows, cols, mask, stride_mr, stride_md,
                            stride_lr, stride_ld, IS_FP64)  # fmt: skip
        acc += _kl_row_terms(mu, lv, mask)
    tl.store(kl_ptr + rows, -0.5 * acc, mask=row_mask)


@jit
def _kl_divergence_bwd_kernel(
    g_ptr,  # *ACC (R,) contiguous upstream gradient per row
    mu_ptr,  # *T (R, D) means
    logvar_ptr,  # *T (R, D) log-variances
    dmu_ptr,  # *T (R, D) contiguous output dL/dmu
    dlogvar_ptr,  # *T (R, D) contiguous output dL/dlogvar
    R, D,  # rows, latent dim
    stride_mr, stride_md,  # strides of mu
    stride_lr, stride_ld,  # strides of logvar
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # columns per program (grid axis 1 covers D)
    IS_FP64: tl.constexpr,  # compute in fp64 instead of fp32
):  # fmt: skip
    acc_t = tl.float64 if IS_FP64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < R
    mask = row_mask[:, None] & (cols < D)[None, :]
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0).to(acc_t)[:, None]  # (BLOCK_R, 1)
    mu, lv = _load_rows(mu_ptr, logvar_ptr, rows, cols, mask, stride_mr, stride_md,
                        stride_lr, stride_ld, IS_FP64)  # fmt: skip
    out = rows[:, None] * D + cols[None, :]
    tl.store(dmu_ptr + out, (g * mu).to(dmu_ptr.dtype.element_ty), mask=mask)
    dlv = g * 0.5 * (tl.exp(lv) - 1.0)
    tl.store(dlogvar_ptr + out, dlv.to(dlogvar_ptr.dtype.element_ty), mask=mask)


def _launch_params(rows: int, dim: int) -> dict[str, int]:
    """Tiles of about 4096 elements: the whole row when D <= 1024, else 1024-wide steps."""
    block_d = min(1024, max(16, next_pow2(dim)))
    block_r = min(max(1, 4096 // block_d), max(1, next_pow2(rows)))
    return {"BLOCK_R": block_r, "BLOCK_D": block_d, "num_warps": 4}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (R, D) view (copy only when no view exists)."""
    return t.reshape(-1, t.shape[-1])


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_impl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    mu2, lv2 = _rows(mu), _rows(logvar)
    R, D = mu2.shape
    kl = torch.empty(R, dtype=_acc_dtype(mu.dtype), device=mu.device)
    if R > 0:
        p = _launch_params(R, D)
        launch(_kl_divergence_fwd_kernel, (cdiv(R, p["BLOCK_R"]),), mu2, lv2, kl, R, D,
               mu2.stride(0), mu2.stride(1), lv2.stride(0), lv2.stride(1),
               IS_FP64=mu.dtype == torch.float64, **p)  # fmt: skip
    return kl.reshape(mu.shape[:-1])


def _fwd_fake(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return mu.new_empty(mu.shape[:-1], dtype=_acc_dtype(mu.dtype))


def _bwd_impl(
    g: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    mu2, lv2 = _rows(mu), _rows(logvar)
    R, D = mu2.shape
    g = g.reshape(-1).contiguous()
    dmu = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    dlogvar = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    if R > 0 and D > 0:
        p = _launch_params(R, D)
        grid = (cdiv(R, p["BLOCK_R"]), cdiv(D, p["BLOCK_D"]))
        launch(_kl_divergence_bwd_kernel, grid, g, mu2, lv2, dmu, dlogvar, R, D,
               mu2.stride(0), mu2.stride(1), lv2.stride(0), lv2.stride(1),
               IS_FP64=mu.dtype == torch.float64, **p)  # fmt: skip
    return dmu, dlogvar


def _bwd_fake(
    g: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return mu.new_empty(mu.shape), logvar.new_empty(logvar.shape)


_FWD = OpPair("kl_divergence_fwd", _fwd_impl, _fwd_fake, "(Tensor mu, Tensor logvar) -> Tensor")
_BWD = OpPair(
    "kl_divergence_bwd", _bwd_impl, _bwd_fake,
    "(Tensor g, Tensor mu, Tensor logvar) -> (Tensor, Tensor)",
)  # fmt: skip


def _setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu, logvar = ctx.saved_tensors
    return _BWD(g, mu, logvar)


_FWD.register_autograd(_backward, _setup_context)


def _reduce(kl_rows: torch.Tensor, reduction: str, row_size: int) -> torch.Tensor:
    """Apply the reduction to per-row KL values; see the module docstring."""
    if reduction == "none":
        return kl_rows
    total = kl_rows.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(1, kl_rows.numel() * row_size)
    return total / max(1, kl_rows.numel())  # batchmean


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """KL divergence of N(mu, exp(logvar)) from N(0, I), summed over the last dim.

    Args:
        mu: means (..., D); for (B, *latent) latents flatten to (B, -1) first.
        logvar: log-variances, same shape, dtype and device as `mu`.
        reduction: "none" -> per-row KL of shape mu.shape[:-1]; "sum" -> scalar sum;
            "mean" -> sum / (rows * D), the mean over all elements (torch's KLDivLoss
            convention); "batchmean" -> sum / rows, the mean per-row KL (the usual VAE term).

    Returns:
        float32 tensor (float64 for float64 inputs), differentiable in mu and logvar.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"kl_divergence(): unknown reduction {reduction!r}: expected one of "
            f"{', '.join(REDUCTIONS)}"
        )
    check_pair("kl_divergence", mu, logvar, ("mu", "logvar"))
    if dispatch.resolve(mu) == "torch":
        return kl_divergence_ref(mu, logvar, reduction)
    return _reduce(_FWD(mu, logvar), reduction, mu.shape[-1])


def kl_divergence_ref(
    mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "none"
) -> torch.Tensor:
    """Pure-PyTorch KL divergence over the last dim, computed in at least float32."""
    acc = torch.promote_types(mu.dtype, torch.float32)
    mu, logvar = mu.to(acc), logvar.to(acc)
    kl_rows = -0.5 * (1 + logvar - mu * mu - torch.exp(logvar)).sum(-1)
    return _reduce(kl_rows, reduction, mu.shape[-1])
