"""kernels.reparameterize: z = mu + exp(0.5 logvar) eps, with eps regenerated in backward.

The Triton path draws its own Philox noise, so z is checked against the formula with the eps
the kernel used, read back as z for mu = 0, logvar = 0 (eps depends only on seed and position).
"""

from __future__ import annotations

import math

import pytest
import torch

import kernels
from tests.conftest import assert_close_to_reference
from tests.kernels.conftest import DEVICE, ELEMENTWISE_DTYPES, noncontiguous, rand_logvar, randn

pytestmark = pytest.mark.triton

SHAPES = [(1, 1), (1, 3), (37, 29), (2, 3, 5)]


def kernel_eps(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The kernel's eps for `seed`, exactly (fp32 draws stored in fp64)."""
    zeros = torch.zeros(shape, dtype=torch.float64, device=DEVICE)
    return kernels.reparameterize(zeros, zeros, seed=seed)


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_formula(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    mu, logvar = randn(*shape, dtype=dtype), rand_logvar(shape, dtype)
    z = kernels.reparameterize(mu, logvar, seed=1234)
    eps = kernel_eps(shape, 1234)
    expected = mu.double() + torch.exp(0.5 * logvar.double()) * eps
    eager = mu + torch.exp(0.5 * logvar) * eps.to(dtype)
    assert z.shape == mu.shape and z.dtype == dtype
    assert_close_to_reference(z, expected, eager)


def test_noncontiguous_inputs() -> None:
    mu, logvar = noncontiguous(randn(33, 20)), noncontiguous(rand_logvar((33, 20), torch.float32))
    z = kernels.reparameterize(mu, logvar, seed=7)
    expected = mu.double() + torch.exp(0.5 * logvar.double()) * kernel_eps((33, 20), 7)
    assert_close_to_reference(z, expected)


def test_same_seed_same_z_and_streams_differ() -> None:
    mu, logvar = randn(16, 24), randn(16, 24)
    z1 = kernels.reparameterize(mu, logvar, seed=5)
    assert torch.equal(z1, kernels.reparameterize(mu, logvar, seed=5))
    assert not torch.equal(z1, kernels.reparameterize(mu, logvar, seed=6))
    other_offset = torch.tensor([5, 1], dtype=torch.int64, device=DEVICE)
    z_off = kernels.reparameterize(mu, logvar, seed=other_offset)
    assert not torch.equal(z1, z_off)
    assert torch.equal(z1, kernels.reparameterize(mu, logvar, seed=torch.tensor([5, 0])))


def test_seed_none_follows_manual_seed() -> None:
    mu, logvar = randn(8, 16), randn(8, 16)
    torch.manual_seed(3)
    z1 = kernels.reparameterize(mu, logvar)
    z2 = kernels.reparameterize(mu, logvar)
    torch.manual_seed(3)
    assert torch.equal(z1, kernels.reparameterize(mu, logvar))
    assert not torch.equal(z1, z2)


def test_noise_is_standard_normal() -> None:
    n = 64 * 64
    eps = kernel_eps((64, 64), 99).reshape(-1)
    assert abs(eps.mean().item()) < 5 / math.sqrt(n)
    assert abs(eps.std().item() - 1) < 5 * math.sqrt(0.5 / n)
    inside = (eps.abs() < 1).double().mean().item()  # P(|N(0,1)| < 1) = 0.6827
    assert abs(inside - 0.6827) < 5 * math.sqrt(0.6827 * 0.3173 / n)
    lag1 = torch.corrcoef(torch.stack([eps[:-1], eps[1:]]))[0, 1].item()
    assert abs(lag1) < 5 / math.sqrt(n)  # neighbours (same Philox call) are uncorrelated
    lanes = eps.reshape(-1, 4).mean(0)  # the 4 outputs of one Philox call
    assert lanes.abs().max().item() < 5 / math.sqrt(n / 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_backward_matches_analytic(dtype: torch.dtype) -> None:
    shape = (19, 13)
    mu = randn(*shape, dtype=dtype).requires_grad_()
    logvar = rand_logvar(shape, dtype).requires_grad_()
    g = randn(*shape, dtype=dtype)  # not ones
    z = kernels.reparameterize(mu, logvar, seed=21)
    dmu, dlogvar = torch.autograd.grad(z, (mu, logvar), g)
    eps = kernel_eps(shape, 21)
    lv64, g64 = logvar.detach().double(), g.double()
    expected = g64 * 0.5 * torch.exp(0.5 * lv64) * eps
    eager = g * 0.5 * torch.exp(0.5 * logvar.detach()) * eps.to(dtype)
    assert torch.equal(dmu, g)
    assert_close_to_reference(dlogvar, expected, eager)


def test_gradcheck_float64() -> None:
    mu = randn(3, 5, dtype=torch.float64).requires_grad_()
    logvar = randn(3, 5, dtype=torch.float64).requires_grad_()
    fixed_noise = lambda m, v: kernels.reparameterize(m, v, seed=11)
    assert torch.autograd.gradcheck(fixed_noise, (mu, logvar))


def test_empty_input() -> None:
    mu = torch.empty(0, 4, device=DEVICE)
    assert kernels.reparameterize(mu, mu, seed=1).shape == (0, 4)


def test_reference_same_seed_same_z() -> None:
    mu, logvar = randn(6, 4), randn(6, 4)
    z = kernels.reparameterize_ref(mu, logvar, seed=3)
    assert torch.equal(z, kernels.reparameterize_ref(mu, logvar, seed=3))
    eps = (z - mu) / torch.exp(0.5 * logvar)
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    assert torch.allclose(eps, torch.randn(6, 4, generator=gen, device=DEVICE), atol=1e-4)


@pytest.mark.parametrize(
    ("mu", "logvar", "seed", "error", "match"),
    [
        (torch.zeros(2, 3), torch.zeros(3, 2), None, ValueError, "same shape"),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64), None, TypeError, "same dtype"),
        (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3), None, TypeError, "dtype"),
        (torch.zeros(2, 3), torch.zeros(2, 3), 1.5, TypeError, "seed"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), ValueError, "seed"),
    ],
)
def test_invalid_inputs(mu, logvar, seed, error, match) -> None:  # noqa: ANN001
    with pytest.raises(error, match=match):
        kernels.reparameterize(mu.to(DEVICE), logvar.to(DEVICE), seed=seed)
