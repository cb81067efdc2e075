"""kernels.vq_ema_update: per-code counts and sums with atomics, against index_add_ in fp64."""

from __future__ import annotations

import pytest
import torch

import kernels
from tests.conftest import assert_close_to_reference
from tests.kernels.conftest import DEVICE, ELEMENTWISE_DTYPES, randn

pytestmark = pytest.mark.triton


def expected(x: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat, idx = x.reshape(-1, x.shape[-1]).double(), idx.reshape(-1)
    keep = (idx >= 0) & (idx < k)
    counts = torch.zeros(k, dtype=torch.float64, device=DEVICE)
    sums = torch.zeros(k, flat.shape[1], dtype=torch.float64, device=DEVICE)
    return counts.index_add_(0, idx[keep], torch.ones_like(idx[keep], dtype=torch.float64)), (
        sums.index_add_(0, idx[keep], flat[keep])
    )


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize(("n", "k", "d"), [(1, 1, 3), (300, 7, 5), (40, 3, 300)])
def test_counts_and_sums(n: int, k: int, d: int, dtype: torch.dtype) -> None:
    x, idx = randn(n, d, dtype=dtype), torch.randint(0, k, (n,), device=DEVICE)
    counts, sums = kernels.vq_ema_update(x, idx, k)
    exp_counts, exp_sums = expected(x, idx, k)
    assert counts.dtype == sums.dtype == torch.float32
    assert torch.equal(counts.double(), exp_counts)
    assert_close_to_reference(sums, exp_sums, kernels.vq_ema_update_ref(x, idx, k)[1])


def test_out_of_range_indices_are_ignored() -> None:
    x = randn(6, 2)
    idx = torch.tensor([0, -1, 2, 5, 2, 1], device=DEVICE)
    counts, sums = kernels.vq_ema_update(x, idx, 3)
    assert counts.tolist() == [1.0, 1.0, 2.0]
    torch.testing.assert_close(sums[2], x[2] + x[4])
    ref_counts, ref_sums = kernels.vq_ema_update_ref(x, idx, 3)
    assert torch.equal(ref_counts, counts)
    torch.testing.assert_close(ref_sums, sums)


def test_leading_dims_and_noncontiguous() -> None:
    x = randn(2, 4, 3, 5).permute(0, 2, 3, 1)  # (B, h, w, D)
    idx = torch.randint(0, 6, (2, 3, 5), device=DEVICE)
    counts, sums = kernels.vq_ema_update(x, idx, 6)
    exp_counts, exp_sums = expected(x, idx, 6)
    assert torch.equal(counts.double(), exp_counts)
    assert_close_to_reference(sums, exp_sums)


@pytest.mark.parametrize(
    ("idx", "k", "error", "match"),
    [
        (torch.zeros(4, dtype=torch.int32), 3, TypeError, "int64"),
        (torch.zeros(5, dtype=torch.int64), 3, ValueError, "shape"),
        (torch.zeros(4, dtype=torch.int64), 0, ValueError, "num_codes"),
    ],
)
def test_invalid_inputs(idx: torch.Tensor, k: int, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        kernels.vq_ema_update(randn(4, 3), idx.to(DEVICE), k)
