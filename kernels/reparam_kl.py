"""Fused reparameterization + per-row KL: mu and logvar are read once, z and kl written once.

Forward, for the (R, D) view (R = prod(shape[:-1])), flat index f = r * D + d:
    eps[f]  = Philox normal for element f (kernels/_random.py: the same eps as `reparameterize`
              with the same seed, so z matches it exactly)
    z[f]    = mu[f] + exp(0.5 * logvar[f]) * eps[f]
    kl[r]   = -0.5 * sum_d (1 + logvar[r, d] - mu[r, d]^2 - exp(logvar[r, d]))
Backward, with upstream gradients gz (R, D) and gkl (R,), eps regenerated:
    dmu     = gz + gkl[r] * mu
    dlogvar = gz * 0.5 * exp(0.5 * logvar) * eps + gkl[r] * 0.5 * (exp(logvar) - 1)

Memory traffic per element (s = bytes of the dtype): forward reads mu, logvar and writes z, 3s
(+4 bytes per row for kl), against 5s for `reparameterize` followed by `kl_divergence`; backward
reads gz, mu, logvar and writes dmu, dlogvar, 5s.
Arithmetic in fp32 (fp64 for float64 inputs); kl is float32 (float64 for float64 inputs).
Limits: as `reparameterize`; the forward runs one Philox call per element (the flat kernels of
`reparameterize` amortise one call over 4 elements), the backward uses the flat layout.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels import dispatch
from kernels._common import OpPair, cdiv, check_pair, jit, launch, next_pow2, seed_tensor
from kernels._random import _normal_at, _normal_block
from kernels.kl import _acc_dtype, _kl_row_terms, _load_rows, _rows, kl_divergence_ref
from kernels.reparam import _launch_params as _bwd_params  # the same flat layout
from kernels.reparam import ref_seed, reparameterize_ref

tl: Any = None  # bound to triton.language on first launch (kernels._common.LazyJit)


@jit
def _reparameterize_kl_fwd_kernel(
    mu_ptr,  # *T (R, D) means
    logvar_ptr,  # *T (R, D) log-variances
    z_ptr,  # *T (R, D) contiguous output sample
    kl_ptr,  # *ACC (R,) output per-row KL
    seed_ptr,  # *int64 (2,) [Philox seed, stream offset]
    R, D,  # rows, latent dim
    stride_mr, stride_md,  # strides of mu
    stride_lr, stride_ld,  # strides of logvar
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # columns per loop step
    IS_FP64: tl.constexpr,  # compute in fp64 instead of fp32
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
        flat = rows[:, None] * D + cols[None, :]  # (BLOCK_R, BLOCK_D) int64
        eps = _normal_at(seed_ptr, flat).to(acc_t)
        z = mu + tl.exp(0.5 * lv) * eps
        tl.store(z_ptr + flat, z.to(z_ptr.dtype.element_ty), mask=mask)
        acc += _kl_row_terms(mu, lv, mask)
    tl.store(kl_ptr + rows, -0.5 * acc, mask=row_mask)


@jit
def _reparameterize_kl_bwd_kernel(
    gz_ptr,  # *T (n,) contiguous dL/dz
    gkl_ptr,  # *ACC (R,) contiguous dL/dkl
    mu_ptr,  # *T (n,) contiguous means
    logvar_ptr,  # *T (n,) contiguous log-variances
    dmu_ptr,  # *T (n,) output dL/dmu
    dlogvar_ptr,  # *T (n,) output dL/dlogvar
    seed_ptr,  # *int64 (2,) [Philox seed, stream offset] used by the forward
    n, D,  # elements, latent dim (row of element f is f // D)
    BLOCK: tl.constexpr,  # elements per program, a multiple of 4
    IS_FP64: tl.constexpr,  # compute in fp64 instead of fp32
):  # fmt: skip
    acc_t = tl.float64 if IS_FP64 else tl.float32
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    gz = tl.load(gz_ptr + offs, mask=mask, other=0.0).to(acc_t)
    gkl = tl.load(gkl_ptr + offs // D, mask=mask, other=0.0).to(acc_t)
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(acc_t)
    lv = tl.load(logvar_ptr + offs, mask=mask, other=0.0).to(acc_t)
    eps = _normal_block(seed_ptr, start, BLOCK).to(acc_t)
    tl.store(dmu_ptr + offs, (gz + gkl * mu).to(dmu_ptr.dtype.element_ty), mask=mask)
    dlv = gz * 0.5 * tl.exp(0.5 * lv) * eps + gkl * 0.5 * (tl.exp(lv) - 1.0)
    tl.store(dlogvar_ptr + offs, dlv.to(dlogvar_ptr.dtype.element_ty), mask=mask)


def _fwd_params(rows: int, dim: int) -> dict[str, int]:
    """Tiles of about 2048 elements (the per-element Philox makes this kernel ALU-heavy)."""
    block_d = min(512, max(16, next_pow2(dim)))
    block_r = min(max(1, 2048 // block_d), max(1, next_pow2(rows)))
    return {"BLOCK_R": block_r, "BLOCK_D": block_d, "num_warps": 4}


def _fwd_impl(
    mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    mu2, lv2 = _rows(mu), _rows(logvar)
    R, D = mu2.shape
    z = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    kl = torch.empty(R, dtype=_acc_dtype(mu.dtype), device=mu.device)
    if R > 0:
        p = _fwd_params(R, D)
        launch(_reparameterize_kl_fwd_kernel, (cdiv(R, p["BLOCK_R"]),), mu2, lv2, z, kl, seed,
               R, D, mu2.stride(0), mu2.stride(1), lv2.stride(0), lv2.stride(1),
               IS_FP64=mu.dtype == torch.float64, **p)  # fmt: skip
    return z, kl.reshape(mu.shape[:-1])


def _fwd_fake(
    mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.empty_like(mu, memory_format=torch.contiguous_format)
    return z, mu.new_empty(mu.shape[:-1], dtype=_acc_dtype(mu.dtype))


def _bwd_impl(
    gz: torch.Tensor, gkl: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    gz, mu, logvar = gz.contiguous(), mu.contiguous(), logvar.contiguous()
    gkl = gkl.reshape(-1).contiguous()
    dmu, dlogvar = torch.empty_like(mu), torch.empty_like(logvar)
    n, D = mu.numel(), mu.shape[-1]
    if n > 0:
        p = _bwd_params(n)
        launch(_reparameterize_kl_bwd_kernel, (cdiv(n, p["BLOCK"]),), gz, gkl, mu, logvar,
               dmu, dlogvar, seed, n, D, IS_FP64=mu.dtype == torch.float64, **p)  # fmt: skip
    return dmu, dlogvar


def _bwd_fake(
    gz: torch.Tensor, gkl: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = torch.contiguous_format
    return torch.empty_like(mu, memory_format=fmt), torch.empty_like(logvar, memory_format=fmt)


_FWD = OpPair(
    "reparameterize_kl_fwd", _fwd_impl, _fwd_fake,
    "(Tensor mu, Tensor logvar, Tensor seed) -> (Tensor, Tensor)",
)  # fmt: skip
_BWD = OpPair(
    "reparameterize_kl_bwd", _bwd_impl, _bwd_fake,
    "(Tensor gz, Tensor gkl, Tensor mu, Tensor logvar, Tensor seed) -> (Tensor, Tensor)",
)  # fmt: skip


def _setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
    ctx.save_for_backward(*inputs)


def _backward(
    ctx: Any, gz: torch.Tensor | None, gkl: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    mu, logvar, seed = ctx.saved_tensors
    if gz is None:
        gz = torch.zeros_like(mu)
    if gkl is None:
        gkl = mu.new_zeros(mu.shape[:-1], dtype=_acc_dtype(mu.dtype))
    dmu, dlogvar = _BWD(gz, gkl, mu, logvar, seed)
    return dmu, dlogvar, None


_FWD.register_autograd(_backward, _setup_context)


def reparameterize_kl(
    mu: torch.Tensor, logvar: torch.Tensor, seed: int | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample z and compute the per-row KL to N(0, I) in one pass over mu and logvar.

    Args:
        mu: means (..., D), float16 / bfloat16 / float32 / float64.
        logvar: log-variances, same shape, dtype and device as `mu`.
        seed: as in `reparameterize` (None, an int, or a (2,) int64 tensor [seed, offset]).

    Returns:
        (z, kl): z like `mu` (equal to `reparameterize(mu, logvar, seed)` on the same backend),
        kl of shape mu.shape[:-1] in float32 (float64 for float64 inputs), i.e.
        `kl_divergence(mu, logvar, "none")`. Both are differentiable in mu and logvar.
    """
    check_pair("reparameterize_kl", mu, logvar, ("mu", "logvar"))
    if dispatch.resolve(mu) == "torch":
        return reparameterize_kl_ref(mu, logvar, ref_seed(seed))
    return _FWD(mu, logvar, seed_tensor(seed, mu.device))


def reparameterize_kl_ref(
    mu: torch.Tensor, logvar: torch.Tensor, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (reparameterize_ref(mu, logvar, seed), kl_divergence_ref(mu, logvar))."""
    return reparameterize_ref(mu, logvar, seed), kl_divergence_ref(mu, logvar)
