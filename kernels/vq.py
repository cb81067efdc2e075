"""Vector quantization with a fused nearest-code search (VQ-VAE, van den Oord et al. 2017,
arXiv:1711.00937; semantics as in lucidrains/vector-quantize-pytorch).

Forward, for x viewed as (N, D) rows and a codebook E (K, D):
    idx[i]    = argmin_k ||x_i - e_k||^2 = argmin_k (||e_k||^2 - 2 x_i . e_k)   (||x_i||^2 dropped)
    q[i]      = e_idx[i]                                    (quantized value, exactly the code)
    loss      = (1 + beta) * mse,   mse = sum_i ||x_i - e_idx[i]||^2 / (N * D)
              = codebook_loss (sg(x) - e)^2 + beta * commitment_loss (x - sg(e))^2
The distance is computed tile by tile with tl.dot (BLOCK_N rows x BLOCK_K codes) and a running
argmin carried across the K tiles: the N x K matrix is never materialised. Ties go to the lowest
index, as torch.argmin.
Backward, with upstream gradients gq (N, D) and gloss (scalar):
    dx    = gq + gloss * beta * 2 (x - e_idx) / (N * D)              (straight-through + commitment)
    dE[k] = sum_{i: idx_i = k} gloss * 2 (e_k - x_i) / (N * D)       (codebook term; fp32 atomics)
The straight-through output q gives the codebook no gradient. With a codebook that does not
require grad (EMA updates) dE is skipped.

Memory traffic (s = bytes of the dtype): forward reads x (N*D*s) and streams the codebook once
per BLOCK_N rows (N/BLOCK_N * K*D*s, from L2 in practice), writes q (N*D*s) and idx (8N);
2*N*K*D flops. Backward reads gq, x, gathered codes and writes dx: 4*N*D*s, plus N*D fp32 atomics.
Precision: products accumulate in fp32 (fp64 for float64). fp32 distances use exact fp32 dots
unless torch.backends.cuda.matmul.allow_tf32 is True, then tf32 (about 1e-3 relative: near-ties
may pick another code than an fp32 reference; the loss always uses the exact chosen code).
Limits: D <= 1024 (larger D: use vq_quantize_ref); x and codebook of the same dtype and device;
the loss is float32 (float64 for float64 inputs); NaN rows map to an arbitrary valid index.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels import dispatch
from kernels._common import OpPair, cdiv, check_float, jit, launch, next_pow2

tl: Any = None  # bound to triton.language on first launch (kernels._common.LazyJit)

MAX_D = 1024


@jit
def _vq_quantize_fwd_kernel(
    x_ptr,  # *T (N, D) inputs
    e_ptr,  # *T (K, D) codebook
    idx_ptr,  # *int64 (N,) output nearest-code index
    q_ptr,  # *T (N, D) contiguous output codebook[idx] (only with QUANTIZE)
    sqerr_ptr,  # *ACC (N,) output ||x_i - e_idx||^2 (only with QUANTIZE)
    N, K, D,  # rows, codes, dim
    stride_xn, stride_xd,  # strides of x
    stride_ek, stride_ed,  # strides of the codebook
    BLOCK_N: tl.constexpr,  # rows per program (>= 16 for tl.dot)
    BLOCK_K: tl.constexpr,  # codes per loop step (>= 16)
    BLOCK_D: tl.constexpr,  # next power of two >= D (>= 16)
    QUANTIZE: tl.constexpr,  # also gather the codes and the squared errors
    IS_FP64: tl.constexpr,  # accumulate in fp64 instead of fp32
    PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" or "tf32"
):  # fmt: skip
    acc_t = tl.float64 if IS_FP64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)  # (BLOCK_D,)
    row_mask = rows < N
    x_mask = row_mask[:, None] & (cols < D)[None, :]
    x = tl.load(
        x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd, mask=x_mask, other=0.0
    )  # (BLOCK_N, BLOCK_D), native dtype for tl.dot
    best = tl.full((BLOCK_N,), float("inf"), dtype=acc_t)
    best_idx = tl.zeros((BLOCK_N,), dtype=tl.int64)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K).to(tl.int64)  # (BLOCK_K,)
        k_mask = codes < K
        e_t = tl.load(
            e_ptr + codes[None, :] * stride_ek + cols[:, None] * stride_ed,
            mask=(cols < D)[:, None] & k_mask[None, :],
            other=0.0,
        )  # (BLOCK_D, BLOCK_K)
        e_acc = e_t.to(acc_t)
        e_sq = tl.sum(e_acc * e_acc, axis=0)  # (BLOCK_K,) ||e_k||^2
        xe = tl.dot(x, e_t, input_precision=PRECISION, out_dtype=acc_t)  # (BLOCK_N, BLOCK_K)
        dist = tl.where(k_mask[None, :], e_sq[None, :] - 2.0 * xe, float("inf"))
        tile_best, tile_idx = tl.min(dist, axis=1, return_indices=True)  # lowest index on ties
        better = tile_best < best  # strict: earlier tiles win ties
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, k0 + tile_idx.to(tl.int64), best_idx)
    tl.store(idx_ptr + rows, best_idx, mask=row_mask)
    if QUANTIZE:
        e = tl.load(
            e_ptr + best_idx[:, None] * stride_ek + cols[None, :] * stride_ed,
            mask=x_mask,
            other=0.0,
        )  # (BLOCK_N, BLOCK_D) gathered codes
        tl.store(q_ptr + rows[:, None] * D + cols[None, :], e, mask=x_mask)
        diff = x.to(acc_t) - e.to(acc_t)
        tl.store(sqerr_ptr + rows, tl.sum(diff * diff, axis=1), mask=row_mask)


@jit
def _vq_quantize_bwd_kernel(
    gq_ptr,  # *T (N, D) contiguous dL/dq
    coef_ptr,  # *ACC (2,) [dL/dloss, beta * dL/dloss]
    x_ptr,  # *T (N, D) inputs
    e_ptr,  # *T (K, D) codebook
    idx_ptr,  # *int64 (N,) chosen codes
    dx_ptr,  # *T (N, D) contiguous output dL/dx
    de_ptr,  # *ACC (K, D) contiguous, zeroed: dL/dE accumulated with atomics (NEED_DE only)
    N, D,  # rows, dim
    stride_xn, stride_xd,  # strides of x
    stride_ek, stride_ed,  # strides of the codebook
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next power of two >= D
    NEED_DE: tl.constexpr,  # accumulate the codebook gradient
    IS_FP64: tl.constexpr,  # compute in fp64 instead of fp32
):  # fmt: skip
    acc_t = tl.float64 if IS_FP64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols < D)[None, :]
    numel = (tl.zeros((), dtype=acc_t) + N) * D  # float: no int32 overflow, N may be constexpr 1
    scale = tl.load(coef_ptr).to(acc_t) * 2.0 / numel  # gloss * d(mse)/d(x - e)
    beta_scale = tl.load(coef_ptr + 1).to(acc_t) * 2.0 / numel  # beta * gloss * d(mse)/d(x - e)
    idx = tl.load(idx_ptr + rows, mask=row_mask, other=0)
    x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd,
                mask=mask, other=0.0).to(acc_t)  # fmt: skip
    e = tl.load(e_ptr + idx[:, None] * stride_ek + cols[None, :] * stride_ed,
                mask=mask, other=0.0).to(acc_t)  # fmt: skip
    flat = rows[:, None] * D + cols[None, :]
    gq = tl.load(gq_ptr + flat, mask=mask, other=0.0).to(acc_t)
    dx = gq + beta_scale * (x - e)
    tl.store(dx_ptr + flat, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_DE:
        tl.atomic_add(de_ptr + idx[:, None] * D + cols[None, :], scale * (e - x), mask=mask)


def _launch_params(dim: int) -> dict[str, int]:
    """Register budget: BLOCK_N x BLOCK_D inputs plus a BLOCK_D x BLOCK_K code tile."""
    block_d = max(16, next_pow2(dim))
    if block_d <= 64:
        return {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": block_d, "num_warps": 4}
    if block_d <= 256:
        return {"BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": block_d, "num_warps": 8}
    return {"BLOCK_N": 32, "BLOCK_K": 16, "BLOCK_D": block_d, "num_warps": 8}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _precision(dtype: torch.dtype) -> str:
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "ieee"


def _search(x: torch.Tensor, codebook: torch.Tensor, quantize: bool) -> tuple[torch.Tensor, ...]:
    """Launch the forward kernel on x (N, D); returns (idx, q, sqerr)."""
    N, D = x.shape
    K = codebook.shape[0]
    idx = torch.empty(N, dtype=torch.int64, device=x.device)
    q = torch.empty((N, D) if quantize else (0, D), dtype=x.dtype, device=x.device)
    sqerr = torch.empty(N if quantize else 0, dtype=_acc_dtype(x.dtype), device=x.device)
    if N > 0:
        p = _launch_params(D)
        launch(_vq_quantize_fwd_kernel, (cdiv(N, p["BLOCK_N"]),), x, codebook, idx, q, sqerr,
               N, K, D, x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1),
               QUANTIZE=quantize, IS_FP64=x.dtype == torch.float64,
               PRECISION=_precision(x.dtype), **p)  # fmt: skip
    return idx, q, sqerr


def _nearest_impl(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return _search(x, codebook, quantize=False)[0]


def _nearest_fake(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], dtype=torch.int64)


def _fwd_impl(
    x: torch.Tensor, codebook: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    idx, q, sqerr = _search(x, codebook, quantize=True)
    loss = sqerr.sum() * ((1.0 + beta) / max(1, x.numel()))  # (1 + beta) * mse
    return q, idx, loss


def _fwd_fake(
    x: torch.Tensor, codebook: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    idx = x.new_empty(x.shape[0], dtype=torch.int64)
    return x.new_empty(x.shape), idx, x.new_empty((), dtype=_acc_dtype(x.dtype))


def _bwd_impl(
    gq: torch.Tensor, gloss: torch.Tensor, x: torch.Tensor, codebook: torch.Tensor,
    idx: torch.Tensor, beta: float, need_de: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    N, D = x.shape
    gq = gq.contiguous()
    gloss = gloss.to(_acc_dtype(x.dtype)).reshape(1)
    coef = torch.cat([gloss, gloss * beta])  # in the accumulation dtype: exact beta for fp64
    dx = torch.empty((N, D), dtype=x.dtype, device=x.device)
    de = torch.zeros(codebook.shape if need_de else (0, D), dtype=gloss.dtype, device=x.device)
    if N > 0:
        p = _launch_params(D)
        p.pop("BLOCK_K")
        launch(_vq_quantize_bwd_kernel, (cdiv(N, p["BLOCK_N"]),), gq, coef, x, codebook, idx,
               dx, de, N, D, x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1),
               NEED_DE=need_de, IS_FP64=x.dtype == torch.float64, **p)  # fmt: skip
    return dx, de.to(codebook.dtype)


def _bwd_fake(
    gq: torch.Tensor, gloss: torch.Tensor, x: torch.Tensor, codebook: torch.Tensor,
    idx: torch.Tensor, beta: float, need_de: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    de_shape = codebook.shape if need_de else (0, codebook.shape[1])
    return x.new_empty(x.shape), codebook.new_empty(de_shape)


_NEAREST = OpPair(
    "vq_nearest", _nearest_impl, _nearest_fake, "(Tensor x, Tensor codebook) -> Tensor"
)
_FWD = OpPair(
    "vq_quantize_fwd", _fwd_impl, _fwd_fake,
    "(Tensor x, Tensor codebook, float beta) -> (Tensor, Tensor, Tensor)",
)  # fmt: skip
_BWD = OpPair(
    "vq_quantize_bwd", _bwd_impl, _bwd_fake,
    "(Tensor gq, Tensor gloss, Tensor x, Tensor codebook, Tensor idx, float beta, "
    "bool need_de) -> (Tensor, Tensor)",
)  # fmt: skip


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, codebook, beta = inputs
    ctx.beta = beta
    ctx.save_for_backward(x, codebook, output[1])


def _backward(
    ctx: Any, gq: torch.Tensor | None, gidx: Any, gloss: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
    x, codebook, idx = ctx.saved_tensors
    gq = torch.zeros_like(x) if gq is None else gq
    gloss = x.new_zeros((), dtype=_acc_dtype(x.dtype)) if gloss is None else gloss
    need_de = bool(ctx.needs_input_grad[1])
    dx, de = _BWD(gq, gloss, x, codebook, idx, ctx.beta, need_de)
    return dx, (de if need_de else None), None


_FWD.register_autograd(_backward, _setup_context)


def _check(op: str, x: torch.Tensor, codebook: torch.Tensor) -> None:
    check_float(op, "x", x)
    check_float(op, "codebook", codebook)
    if codebook.dim() != 2 or codebook.shape[0] < 1 or codebook.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{op}(): expected a codebook of shape (K >= 1, D={x.shape[-1]}) for x of shape "
            f"{tuple(x.shape)}, got {tuple(codebook.shape)}"
        )
    if codebook.dtype != x.dtype:
        raise TypeError(
            f"{op}(): expected x and codebook of the same dtype, got {x.dtype} and "
            f"{codebook.dtype}: cast x (the quantizer is usually run in float32)"
        )
    if codebook.device != x.device:
        raise ValueError(f"{op}(): x is on {x.device} but the codebook is on {codebook.device}")


def _triton_ok(x: torch.Tensor) -> bool:
    """Dispatch, falling back to the reference above MAX_D under "auto"."""
    backend = dispatch.resolve(x)
    if backend == "triton" and x.shape[-1] > MAX_D:
        if dispatch.get_backend() == "triton":
            raise ValueError(f"vq kernels support D <= {MAX_D}, got D={x.shape[-1]}")
        return False
    return backend == "triton"


def vq_nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code (squared L2) for every vector of x.

    Args:
        x: vectors (..., D), float16 / bfloat16 / float32 / float64.
        codebook: codes (K, D) of the same dtype and device.

    Returns:
        int64 indices of shape x.shape[:-1]; ties go to the lowest index. Not differentiable.
    """
    _check("vq_nearest", x, codebook)
    if not _triton_ok(x):
        return vq_nearest_ref(x, codebook)
    return _NEAREST(x.reshape(-1, x.shape[-1]), codebook).reshape(x.shape[:-1])


def vq_quantize(
    x: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize x to its nearest codes (VQ-VAE), with straight-through gradients.

    Args:
        x: encoder outputs (..., D), float16 / bfloat16 / float32 / float64.
        codebook: codes (K, D) of the same dtype and device; may have requires_grad=False
            (EMA codebooks), then no codebook gradient is computed.
        beta: commitment weight.

    Returns:
        (quantized, indices, loss):
        quantized (..., D) equals codebook[indices]; d quantized / dx is the identity.
        indices (...,) int64.
        loss, a scalar in float32 (float64 for float64 inputs):
        mean((sg(x) - e)^2) + beta * mean((x - sg(e))^2), means over all N * D elements;
        its value is (1 + beta) * mse, its gradient reaches x (commitment) and the codebook.
    """
    _check("vq_quantize", x, codebook)
    if not _triton_ok(x):
        return vq_quantize_ref(x, codebook, beta)
    q, idx, loss = _FWD(x.reshape(-1, x.shape[-1]), codebook, float(beta))
    return q.reshape(x.shape), idx.reshape(x.shape[:-1]), loss


def vq_nearest_ref(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Reference nearest-code search (materialises the (N, K) distances), in >= float32."""
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
    e = torch.nn.functional.embedding(idx, codebook)  # (..., D), gradient flows to the codebook
    acc = torch.promote_types(x.dtype, torch.float32)
    codebook_loss = torch.nn.functional.mse_loss(e.to(acc), x.detach().to(acc))
    commitment_loss = torch.nn.functional.mse_loss(x.to(acc), e.detach().to(acc))
    quantized = e.detach() + (x - x.detach())  # value == codebook[idx], d/dx == identity
    return quantized, idx, codebook_loss + beta * commitment_loss
