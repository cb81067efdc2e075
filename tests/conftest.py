"""Shared test configuration: seeding, device markers and the per-dtype tolerance table.

Markers (declared in pyproject.toml):
  cuda      needs an NVIDIA GPU; skipped with a reason on CPU machines.
  tensorrt  needs TensorRT 10; skipped with a reason where it is not installed.
  slow      end-to-end training / compile; still run in CI unless deselected.
  triton    runs Triton kernels; on the CPU only under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import importlib.util
import os
import random
import zlib

import pytest
import torch

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# Error floor per dtype for comparisons against a float64 reference. A kernel may be off by
# at most 2x the error eager PyTorch makes in the same dtype, plus this floor:
#   float32: rounding of a few fused multiply-adds; tf32 dots are ~3e-4 relative.
#   float16: 10-bit mantissa, one rounding of the output is ~5e-4 relative.
#   bfloat16: 7-bit mantissa, one rounding of the output is ~4e-3 relative.
TOLERANCE_FLOOR: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


def assert_close_to_reference(
    actual: torch.Tensor, expected64: torch.Tensor, eager: torch.Tensor | None = None
) -> None:
    """Assert `actual` is within 2x eager's error (in `actual.dtype`) plus the dtype floor."""
    floor = TOLERANCE_FLOOR[actual.dtype]
    ref = expected64.to(torch.float64)
    eager_err = 0.0 if eager is None else (eager.double() - ref).abs().max().item()
    err = (actual.double() - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    bound = 2 * eager_err + floor * scale
    assert err <= bound, f"max abs error {err:.3e} exceeds bound {bound:.3e} ({actual.dtype})"


# Fresh inputs on every run, reproducible on demand: rerun with VAE_TEST_SEED=<printed value>.
SESSION_SEED = int(os.environ.get("VAE_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config: pytest.Config) -> str:
    return f"vae-engine test seed: VAE_TEST_SEED={SESSION_SEED}"


@pytest.fixture(autouse=True)
def _seed_everything(request: pytest.FixtureRequest) -> int:
    """Seed python and torch per test from the session seed and the test id."""
    seed = (zlib.crc32(request.node.nodeid.encode()) ^ SESSION_SEED) % (2**31)
    random.seed(seed)
    torch.manual_seed(seed)
    return seed


def _has_tensorrt() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason="needs an NVIDIA GPU; none is visible on this machine")
    skip_trt = pytest.mark.skip(reason="needs TensorRT 10 + a GPU; TensorRT is not installed here")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "tensorrt" in item.keywords and not (_has_tensorrt() and torch.cuda.is_available()):
            item.add_marker(skip_trt)
