"""kernels.vq_nearest / vq_quantize: nearest-code search, straight-through output, losses.

Indices may differ from the reference on near-ties, so the search is checked through distances:
the distance to the chosen code must equal the minimum distance (float64) within tolerance.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from tests.conftest import TOLERANCE_FLOOR, assert_close_to_reference
from tests.kernels.conftest import DEVICE, randn

pytestmark = pytest.mark.triton

# (N, K, D): one row and one code, K not a multiple of the 64-code tile, D=300 (512-wide tile)
SIZES = [(1, 1, 3), (37, 5, 3), (200, 70, 64), (10, 33, 300)]
DOT_DTYPES = [
    torch.float32,
    torch.float16,
    torch.float64,
    pytest.param(torch.bfloat16, marks=pytest.mark.cuda),  # bf16 tl.dot is wrong interpreted
]


def sq_dists(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, K) squared distances in float64."""
    x64, e64 = x.reshape(-1, x.shape[-1]).double(), codebook.double()
    return x64.pow(2).sum(-1)[:, None] - 2 * x64 @ e64.t() + e64.pow(2).sum(-1)[None, :]


def assert_nearest(x: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor) -> None:
    """The chosen code's distance equals the minimum (up to the dtype's distance error)."""
    d = sq_dists(x, codebook)
    chosen = d.gather(1, idx.reshape(-1, 1))[:, 0]
    scale = x.double().pow(2).sum(-1).reshape(-1) + codebook.double().pow(2).sum(-1).max()
    slack = 4 * TOLERANCE_FLOOR[x.dtype] * scale  # ||e||^2 - 2 x.e cancels ~ ||x||^2 + ||e||^2
    assert bool((chosen - d.min(1).values <= slack).all()), (chosen - d.min(1).values).max()


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize(("n", "k", "d"), SIZES)
def test_nearest(n: int, k: int, d: int, dtype: torch.dtype) -> None:
    x, codebook = randn(n, d, dtype=dtype), randn(k, d, dtype=dtype)
    idx = kernels.vq_nearest(x, codebook)
    assert idx.dtype == torch.int64 and idx.shape == (n,)
    assert bool(((idx >= 0) & (idx < k)).all())
    assert_nearest(x, codebook, idx)


def test_nearest_leading_dims_and_noncontiguous() -> None:
    x = randn(2, 8, 5, 6).permute(0, 2, 3, 1)  # (B, h, w, D) view of (B, D, h, w), as the model
    codebook = randn(8, 40).t()  # (K=40, D=8), transposed storage
    idx = kernels.vq_nearest(x, codebook)
    assert idx.shape == (2, 5, 6)
    assert_nearest(x, codebook, idx)


def test_ties_go_to_the_lowest_index() -> None:
    codebook = randn(70, 4)  # two 64-code tiles
    codebook[66] = codebook[1]  # exact duplicates: equal distances for every x,
    codebook[5] = codebook[3]  # across tiles (1, 66) and within a tile (3, 5)
    x = codebook[[1, 66, 3, 5]] + 0.01 * randn(4, 4)
    assert kernels.vq_nearest(x, codebook).tolist() == [1, 1, 3, 3]
    assert kernels.vq_nearest_ref(x, codebook).tolist() == [1, 1, 3, 3]


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize(("n", "k", "d"), SIZES)
def test_quantize_forward(n: int, k: int, d: int, dtype: torch.dtype) -> None:
    x, codebook = randn(n, d, dtype=dtype), randn(k, d, dtype=dtype)
    q, idx, loss = kernels.vq_quantize(x, codebook, beta=0.3)
    assert torch.equal(q, codebook[idx])  # exactly the code
    assert_nearest(x, codebook, idx)
    mse64 = (x.double() - codebook.double()[idx]).pow(2).mean()
    eager = 1.3 * (x.float() - codebook.float()[idx]).pow(2).mean()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_reference(loss, 1.3 * mse64, eager)


def reference_grads(x, codebook, idx, gq, gloss, beta):  # noqa: ANN001, ANN201
    """Autograd of the reference's loss terms in float64 with the kernel's indices."""
    x64 = x.detach().double().requires_grad_()
    e64 = codebook.detach().double().requires_grad_()
    e = e64[idx]
    q = e.detach() + (x64 - x64.detach())
    loss = (e - x64.detach()).pow(2).mean() + beta * (x64 - e.detach()).pow(2).mean()
    return torch.autograd.grad((q, loss), (x64, e64), (gq.double(), gloss.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize(("n", "k", "d"), [(1, 1, 3), (200, 70, 64)])
def test_quantize_backward(n: int, k: int, d: int, dtype: torch.dtype) -> None:
    x = randn(n, d, dtype=dtype).requires_grad_()
    codebook = randn(k, d, dtype=dtype).requires_grad_()
    q, idx, loss = kernels.vq_quantize(x, codebook, beta=0.25)
    gq, gloss = randn(n, d, dtype=dtype), torch.tensor(1.7, dtype=loss.dtype, device=DEVICE)
    dx, de = torch.autograd.grad((q, loss), (x, codebook), (gq, gloss))
    exp_dx, exp_de = reference_grads(x, codebook, idx, gq, gloss, 0.25)
    assert dx.dtype == dtype and de.dtype == dtype
    assert_close_to_reference(dx, exp_dx)
    assert_close_to_reference(de, exp_de)


def test_matches_reference_autograd() -> None:
    """Same indices and gradients as autograd through vq_quantize_ref (float64, no near-ties)."""
    x = randn(50, 8, dtype=torch.float64).requires_grad_()
    codebook = randn(12, 8, dtype=torch.float64).requires_grad_()
    q, idx, loss = kernels.vq_quantize(x, codebook, beta=0.4)
    q_r, idx_r, loss_r = kernels.vq_quantize_ref(x, codebook, beta=0.4)
    assert torch.equal(idx, idx_r) and torch.equal(q, q_r)
    gq = randn(50, 8, dtype=torch.float64)
    grads = torch.autograd.grad((q, 2.5 * loss), (x, codebook), (gq, None))
    grads_r = torch.autograd.grad((q_r, 2.5 * loss_r), (x, codebook), (gq, None))
    torch.testing.assert_close(loss, loss_r)
    for g, g_r in zip(grads, grads_r):
        torch.testing.assert_close(g, g_r)


def test_frozen_codebook_ema_mode() -> None:
    x = randn(30, 4).requires_grad_()
    codebook = randn(9, 4)  # requires_grad=False, as with EMA updates
    q, idx, loss = kernels.vq_quantize(x, codebook)
    (dx,) = torch.autograd.grad(q.sum() + loss, (x,))
    expected = 1 + 0.25 * 2 * (x.detach() - codebook[idx]) / x.numel()
    torch.testing.assert_close(dx, expected)


def test_codebook_only_gradient() -> None:
    x, codebook = randn(30, 4), randn(9, 4).requires_grad_()
    q, idx, loss = kernels.vq_quantize(x, codebook)
    (de,) = torch.autograd.grad(loss, (codebook,))
    expected = torch.zeros(9, 4, device=DEVICE).index_add_(
        0, idx, 2 * (codebook.detach()[idx] - x) / x.numel()
    )
    torch.testing.assert_close(de, expected)


@pytest.mark.parametrize(
    ("x", "codebook", "error", "match"),
    [
        (torch.zeros(4, 3), torch.zeros(5, 4), ValueError, "shape"),
        (torch.zeros(4, 3), torch.zeros(5, 3, dtype=torch.float64), TypeError, "same dtype"),
        (torch.zeros(4, 3), torch.zeros(0, 3), ValueError, "K >= 1"),
        (torch.zeros(4, 3, dtype=torch.int32), torch.zeros(5, 3), TypeError, "dtype"),
    ],
)
def test_invalid_inputs(x, codebook, error, match) -> None:  # noqa: ANN001
    with pytest.raises(error, match=match):
        kernels.vq_quantize(x.to(DEVICE), codebook.to(DEVICE))


def test_reference_materialised_search_agrees_with_cdist() -> None:
    x, codebook = randn(64, 16, dtype=torch.float64), randn(32, 16, dtype=torch.float64)
    idx = kernels.vq_nearest_ref(x, codebook)
    assert torch.equal(idx, torch.cdist(x, codebook).argmin(1))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_shape_on_gpu(dtype: torch.dtype) -> None:
    x, codebook = randn(65536, 64, dtype=dtype), randn(4096, 64, dtype=dtype)
    q, idx, loss = kernels.vq_quantize(x, codebook)
    sample = torch.randint(0, 65536, (2048,), device=DEVICE)
    assert_nearest(x[sample], codebook, idx[sample])
    assert torch.equal(q, codebook[idx])
    mse = (x.double() - codebook.double()[idx]).pow(2).mean()
    assert_close_to_reference(loss, 1.25 * mse)
