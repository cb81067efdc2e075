"""Kernel tests: Triton kernels run through the interpreter on CPU machines.

TRITON_INTERPRET must be set before anything imports triton (triton decides once, at import,
whether its own jit functions are interpreted), so it is set here at import time. Run as
    TRITON_INTERPRET=1 python -m pytest tests/kernels -q
to be independent of collection order (torch._dynamo imports triton). On a GPU machine the
variable is left alone and the kernels run natively.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# dtypes the interpreter handles for elementwise kernels; bf16 tl.dot needs a GPU.
ELEMENTWISE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture(autouse=True)
def _triton_backend() -> Iterator[None]:
    """Every kernel test runs the Triton path unless it selects a backend itself."""
    with kernels.use_backend("triton"):
        yield


def logvar_range(dtype: torch.dtype) -> tuple[float, float]:
    """Extreme but representable log-variances: exp(logvar) must fit the dtype."""
    return (-10.0, 10.0) if dtype in (torch.float16, torch.bfloat16) else (-30.0, 20.0)


def rand_logvar(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    lo, hi = logvar_range(dtype)
    return (torch.rand(shape, dtype=torch.float64) * (hi - lo) + lo).to(DEVICE, dtype)


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64).to(DEVICE, dtype)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values, transposed storage: t.T.contiguous().T (2-D)."""
    out = t.t().contiguous().t()
    assert not out.is_contiguous() or t.shape[0] == 1 or t.shape[1] == 1
    return out
