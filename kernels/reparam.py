"""Reparameterized Gaussian sample in one pass (Kingma & Welling 2014, arXiv:1312.6114).

Forward, elementwise over the flattened input (n elements):
    eps = Philox normal for element f with key `seed` (see kernels/_random.py)
    z   = mu + exp(0.5 * logvar) * eps
Backward (eps is regenerated from [seed, offset], never stored):
    dmu     = g
    dlogvar = g * 0.5 * exp(0.5 * logvar) * eps

Memory traffic per element (s = bytes of the dtype): forward reads mu and logvar and writes z,
3s; backward reads g and logvar and writes dlogvar, 3s (dmu is g itself, no copy).
Arithmetic in fp32 (fp64 for float64 inputs); eps is drawn in fp32.
Limits: mu and logvar of the same shape, dtype (fp16/bf16/fp32/fp64) and device; non-contiguous
inputs are copied to contiguous ones first. No size limit (64-bit offsets and Philox counters).
The Triton path and the reference draw different eps for the same seed (same distribution).
"""

from __future__ import annotations

from typing import Any

import torch

from kernels import dispatch
from kernels._common import OpPair, cdiv, check_pair, jit, launch, next_pow2, seed_tensor
from kernels._random import _normal_block

tl: Any = None  # bound to triton.language on first launch (kernels._common.LazyJit)


@jit
def _reparameterize_fwd_kernel(
    mu_ptr,  # *T (n,) contiguous means
    logvar_ptr,  # *T (n,) contiguous log-variances
    z_ptr,  # *T (n,) output sample
    seed_ptr,  # *int64 (2,) [Philox seed, stream offset]
    n,  # number of elements
    BLOCK: tl.constexpr,  # elements per program, a multiple of 4
    IS_FP64: tl.constexpr,  # compute in fp64 instead of fp32
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.float64 if IS_FP64 else tl.float32
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(acc)
    logvar = tl.load(logvar_ptr + offs, mask=mask, other=0.0).to(acc)
    eps = _normal_block(seed_ptr, start, BLOCK).to(acc)
    z = mu + tl.exp(0.5 * logvar) * eps
    tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=mask)


@jit
def _reparameterize_bwd_kernel(
    g_ptr,  # *T (n,) contiguous upstream gradient dL/dz
    logvar_ptr,  # *T (n,) contiguous log-variances
    dlogvar_ptr,  # *T (n,) output dL/dlogvar
    seed_ptr,  # *int64 (2,) [Philox seed, stream offset] used by the forward
    n,  # number of elements
    BLOCK: tl.constexpr,  # elements per program, a multiple of 4
    IS_FP64: tl.constexpr,  # compute in fp64 instead of fp32
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.float64 if IS_FP64 else tl.float32
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc)
    logvar = tl.load(logvar_ptr + offs, mask=mask, other=0.0).to(acc)
    eps = _normal_block(seed_ptr, start, BLOCK).to(acc)
    dlogvar = g * 0.5 * tl.exp(0.5 * logvar) * eps
    tl.store(dlogvar_ptr + offs, dlogvar.to(dlogvar_ptr.dtype.element_ty), mask=mask)


def _launch_params(n: int) -> dict[str, int]:
    """1024 elements per program (8 per thread with 4 warps); a smaller block for tiny inputs."""
    block = min(1024, max(16, next_pow2(n)))
    return {"BLOCK": block, "num_warps": 4 if block >= 512 else 1}


def _elementwise(kernel: Any, a: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor
                 ) -> torch.Tensor:
    """out = kernel(a, logvar) elementwise on contiguous copies, one 1-D grid; `a` (mu forward,
    the upstream gradient backward) has logvar's shape and dtype, and so has out."""
    a, logvar = a.contiguous(), logvar.contiguous()
    out = torch.empty_like(a)
    n = a.numel()
    if n > 0:
        p = _launch_params(n)
        launch(kernel, (cdiv(n, p["BLOCK"]),), a, logvar, out, seed, n,
               IS_FP64=a.dtype == torch.float64, **p)  # fmt: skip
    return out


def _fwd_impl(mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    return _elementwise(_reparameterize_fwd_kernel, mu, logvar, seed)


def _fwd_fake(mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(mu, memory_format=torch.contiguous_format)


def _bwd_impl(g: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    return _elementwise(_reparameterize_bwd_kernel, g, logvar, seed)


def _bwd_fake(g: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(logvar, memory_format=torch.contiguous_format)


_FWD = OpPair(
    "reparameterize_fwd", _fwd_impl, _fwd_fake, "(Tensor mu, Tensor logvar, Tensor seed) -> Tensor"
)
_BWD = OpPair(
    "reparameterize_bwd", _bwd_impl, _bwd_fake, "(Tensor g, Tensor logvar, Tensor seed) -> Tensor"
)


def _setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    _, logvar, seed = inputs
    ctx.save_for_backward(logvar, seed)


def _backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    logvar, seed = ctx.saved_tensors
    dlogvar = _BWD(g, logvar, seed) if ctx.needs_input_grad[1] else None
    return g, dlogvar, None


_FWD.register_autograd(_backward, _setup_context)


def reparameterize(
    mu: torch.Tensor, logvar: torch.Tensor, seed: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Draw z = mu + exp(0.5 * logvar) * eps, eps ~ N(0, I), in one fused pass.

    Args:
        mu: means, any shape (..., D), float16 / bfloat16 / float32 / float64.
        logvar: log-variances, same shape, dtype and device as `mu`.
        seed: None draws [seed, offset] from torch's default generator of mu's device (so
            `torch.manual_seed` makes runs reproducible and CUDA graphs replay fresh noise); an
            int fixes the noise; a (2,) int64 tensor [seed, offset] on the device is used as is.

    Returns:
        z, same shape and dtype as `mu` (contiguous). Differentiable in mu and logvar; backward
        regenerates eps from the seed. The same seed gives the same z on the same backend; the
        Triton and reference backends draw different (equally distributed) eps.
    """
    check_pair("reparameterize", mu, logvar, ("mu", "logvar"))
    if dispatch.resolve(mu) == "torch":
        return reparameterize_ref(mu, logvar, ref_seed(seed))
    return _FWD(mu, logvar, seed_tensor(seed, mu.device))


def ref_seed(seed: int | torch.Tensor | None) -> int | None:
    """The reference's int seed: a (2,) [seed, offset] tensor is folded into one int."""
    if not isinstance(seed, torch.Tensor):
        return seed
    s, offset = (int(v) for v in seed.tolist())
    return (s * 0x9E3779B97F4A7C15 + offset) % 2**63


@torch.library.custom_op(
    "vae_engine::seeded_randn",
    mutates_args=(),
    schema="(SymInt[] shape, ScalarType dtype, Device device, int seed) -> Tensor",
)
def _seeded_randn(
    shape: list[int], dtype: torch.dtype, device: torch.device, seed: int
) -> torch.Tensor:
    """torch.randn from a fresh Generator seeded by `seed`; an op, so torch.compile keeps it."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device, dtype=dtype)


@_seeded_randn.register_fake
def _(shape: list[int], dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _ref_noise(mu: torch.Tensor, seed: int | None) -> torch.Tensor:
    if seed is None:
        return torch.randn_like(mu)
    return _seeded_randn(list(mu.shape), mu.dtype, mu.device, int(seed))


def reparameterize_ref(
    mu: torch.Tensor, logvar: torch.Tensor, seed: int | None = None
) -> torch.Tensor:
    """Pure-PyTorch reparameterization; eps from torch.randn with a Generator seeded by `seed`.

    seed=None uses the default generator (torch.randn_like). An int seed goes through the
    `vae_engine::seeded_randn` op, so both work inside torch.compile(fullgraph=True). A
    (2,) seed tensor given to the public function is read on the host here (`ref_seed`).
    """
    return mu + torch.exp(0.5 * logvar) * _ref_noise(mu, seed)
