"""kernels.kl_divergence against a float64 reference: values, reductions, gradients."""

from __future__ import annotations

import pytest
import torch

import kernels
from tests.conftest import assert_close_to_reference
from tests.kernels.conftest import DEVICE, ELEMENTWISE_DTYPES, noncontiguous, rand_logvar, randn

pytestmark = pytest.mark.triton

SHAPES = [(1, 1), (1, 3), (37, 29), (3, 1500), (2, 3, 5)]  # 1500: two 1024-wide column steps


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    mu, logvar = randn(*shape, dtype=dtype), rand_logvar(shape, dtype)
    kl = kernels.kl_divergence(mu, logvar)
    expected = kernels.kl_divergence_ref(mu.double(), logvar.double())
    eager = kernels.kl_divergence_ref(mu, logvar)
    assert kl.shape == shape[:-1]
    assert kl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_reference(kl, expected, eager)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_reductions(reduction: str) -> None:
    mu, logvar = randn(9, 11), randn(9, 11)
    out = kernels.kl_divergence(mu, logvar, reduction)
    expected = kernels.kl_divergence_ref(mu.double(), logvar.double(), reduction)
    assert_close_to_reference(out, expected)


def test_mean_and_batchmean_definitions() -> None:
    mu, logvar = randn(6, 10), randn(6, 10)
    rows = kernels.kl_divergence(mu, logvar)
    total = kernels.kl_divergence(mu, logvar, "sum")
    torch.testing.assert_close(total, rows.sum())
    torch.testing.assert_close(kernels.kl_divergence(mu, logvar, "batchmean"), total / 6)
    torch.testing.assert_close(kernels.kl_divergence(mu, logvar, "mean"), total / 60)


def test_noncontiguous_inputs() -> None:
    mu = noncontiguous(randn(40, 24))
    logvar = randn(24, 40).t()  # a transposed view, never copied
    kl = kernels.kl_divergence(mu, logvar)
    assert_close_to_reference(kl, kernels.kl_divergence_ref(mu.double(), logvar.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_backward_matches_reference(dtype: torch.dtype, reduction: str) -> None:
    shape = (21, 37)
    mu = randn(*shape, dtype=dtype).requires_grad_()
    logvar = rand_logvar(shape, dtype).requires_grad_()
    out = kernels.kl_divergence(mu, logvar, reduction)
    g = randn(*out.shape, dtype=out.dtype) if out.dim() else torch.tensor(1.7, device=DEVICE)
    grads = torch.autograd.grad(out, (mu, logvar), g.to(out.dtype))
    mu64, lv64 = mu.detach().double().requires_grad_(), logvar.detach().double().requires_grad_()
    ref = kernels.kl_divergence_ref(mu64, lv64, reduction)
    expected = torch.autograd.grad(ref, (mu64, lv64), g.double())
    mu_e, lv_e = mu.detach().requires_grad_(), logvar.detach().requires_grad_()
    eager_out = kernels.kl_divergence_ref(mu_e, lv_e, reduction)
    eager = torch.autograd.grad(eager_out, (mu_e, lv_e), g.to(eager_out.dtype))
    for actual, exp, eag in zip(grads, expected, eager):
        assert actual.dtype == dtype
        assert_close_to_reference(actual, exp, eag)


def test_gradcheck_float64() -> None:
    mu = randn(4, 6, dtype=torch.float64).requires_grad_()
    logvar = randn(4, 6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(kernels.kl_divergence, (mu, logvar))


def test_unknown_reduction_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="none, sum, mean, batchmean"):
        kernels.kl_divergence(randn(2, 3), randn(2, 3), "avg")


def test_empty_rows() -> None:
    mu = torch.empty(0, 5, device=DEVICE)
    assert kernels.kl_divergence(mu, mu).shape == (0,)
