"""kernels.reparameterize_kl: one pass giving reparameterize's z and kl_divergence's rows."""

from __future__ import annotations

import pytest
import torch

import kernels
from tests.conftest import assert_close_to_reference
from tests.kernels.conftest import DEVICE, ELEMENTWISE_DTYPES, noncontiguous, rand_logvar, randn

pytestmark = pytest.mark.triton


def kernel_eps(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    zeros = torch.zeros(shape, dtype=torch.float64, device=DEVICE)
    return kernels.reparameterize(zeros, zeros, seed=seed)


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("shape", [(1, 3), (37, 29), (2, 3, 5), (3, 700)])
def test_matches_separate_ops(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    mu, logvar = randn(*shape, dtype=dtype), rand_logvar(shape, dtype)
    z, kl = kernels.reparameterize_kl(mu, logvar, seed=77)
    assert torch.equal(z, kernels.reparameterize(mu, logvar, seed=77))  # same Philox mapping
    expected = kernels.kl_divergence_ref(mu.double(), logvar.double())
    assert kl.shape == shape[:-1]
    assert_close_to_reference(kl, expected, kernels.kl_divergence_ref(mu, logvar))


def test_noncontiguous_inputs() -> None:
    mu, logvar = noncontiguous(randn(30, 17)), randn(17, 30).t()
    z, kl = kernels.reparameterize_kl(mu, logvar, seed=4)
    expected_z = mu.double() + torch.exp(0.5 * logvar.double()) * kernel_eps((30, 17), 4)
    assert_close_to_reference(z, expected_z)
    assert_close_to_reference(kl, kernels.kl_divergence_ref(mu.double(), logvar.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_backward_matches_analytic(dtype: torch.dtype) -> None:
    shape = (23, 9)
    mu = randn(*shape, dtype=dtype).requires_grad_()
    logvar = rand_logvar(shape, dtype).requires_grad_()
    z, kl = kernels.reparameterize_kl(mu, logvar, seed=8)
    gz, gkl = randn(*shape, dtype=dtype), randn(shape[0], dtype=kl.dtype)
    dmu, dlogvar = torch.autograd.grad((z, kl), (mu, logvar), (gz, gkl))
    eps, mu64, lv64 = kernel_eps(shape, 8), mu.detach().double(), logvar.detach().double()
    g_row = gkl.double()[:, None]
    exp_dmu = gz.double() + g_row * mu64
    exp_dlv = gz.double() * 0.5 * torch.exp(0.5 * lv64) * eps + g_row * 0.5 * torch.expm1(lv64)
    assert_close_to_reference(dmu, exp_dmu, gz + gkl[:, None].to(dtype) * mu.detach())
    lv = logvar.detach()
    eager_dlv = gz * 0.5 * torch.exp(0.5 * lv) * eps.to(dtype) + (
        gkl[:, None] * 0.5 * (torch.exp(lv.float()) - 1)
    ).to(dtype)
    assert_close_to_reference(dlogvar, exp_dlv, eager_dlv)


def test_only_one_output_used() -> None:
    mu, logvar = randn(5, 6).requires_grad_(), randn(5, 6).requires_grad_()
    _, kl = kernels.reparameterize_kl(mu, logvar, seed=1)
    dmu, dlogvar = torch.autograd.grad(kl.sum(), (mu, logvar))
    torch.testing.assert_close(dmu, mu.detach())
    torch.testing.assert_close(dlogvar, 0.5 * torch.expm1(logvar.detach()))
    z, _ = kernels.reparameterize_kl(mu, logvar, seed=1)
    (dmu,) = torch.autograd.grad(z.sum(), (mu,))
    torch.testing.assert_close(dmu, torch.ones_like(mu))


def test_gradcheck_float64() -> None:
    mu = randn(3, 5, dtype=torch.float64).requires_grad_()
    logvar = randn(3, 5, dtype=torch.float64).requires_grad_()
    fixed_noise = lambda m, v: kernels.reparameterize_kl(m, v, seed=2)  # noqa: E731
    assert torch.autograd.gradcheck(fixed_noise, (mu, logvar))


def test_reference_is_the_two_references() -> None:
    mu, logvar = randn(4, 3), randn(4, 3)
    z, kl = kernels.reparameterize_kl_ref(mu, logvar, seed=9)
    assert torch.equal(z, kernels.reparameterize_ref(mu, logvar, seed=9))
    assert torch.equal(kl, kernels.kl_divergence_ref(mu, logvar))
