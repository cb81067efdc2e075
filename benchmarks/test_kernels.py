"""Fused kernels vs the PyTorch reference, eager and compiled: pytest-benchmark.

    pytest benchmarks/test_kernels.py --benchmark-only --benchmark-json=out.json   # on a GPU
    TRITON_INTERPRET=1 pytest benchmarks/test_kernels.py --benchmark-only          # CPU smoke
    python benchmarks/report.py out.json

Groups `<op>-<mode>-<dtype>` (mode fwd or fwdbwd), providers eager (`<op>_ref`), compile
(torch.compile of the reference) and triton (the public op, Triton backend). extra_info holds
GB/s from the ideal traffic in docs/kernels.md, TFLOP/s for the VQ search, the fraction of the
device-to-device copy bandwidth measured in the same session, the device, versions and commit.
On the CPU the shapes are tiny and triton runs only under TRITON_INTERPRET=1 (the interpreter's
times say nothing about a GPU). The standalone GPU report is benchmarks/gpu_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import synchronized
from benchmarks.gpu_kernels import (
    OPS,
    SHORT,
    SIZES_GPU,
    SIZES_SMALL,
    copy_bandwidth,
    flops,
    make_call,
    sizes_for,
)
from kernels.dispatch import interpreter_enabled

CUDA = torch.cuda.is_available()
GPU_ONLY = pytest.mark.skipif(not CUDA, reason="bf16 kernels are timed on a GPU only")
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=[pytest.mark.cuda, GPU_ONLY])]
CASES = [(op, mode) for op, spec in OPS.items() for mode in ("fwd", "fwdbwd")
         if spec.differentiable or mode == "fwd"]  # fmt: skip


@pytest.fixture(scope="module")
def copy_gbs(bench_device: torch.device) -> float:
    return copy_bandwidth(bench_device, small=not CUDA)


@pytest.fixture(scope="module")
def bench_device() -> torch.device:  # module scope for copy_gbs (overrides the conftest one)
    return torch.device("cuda" if CUDA else "cpu")


@pytest.mark.parametrize("provider", ["eager", "compile", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: SHORT[d])
@pytest.mark.parametrize(("op", "mode"), CASES, ids=[f"{o}-{m}" for o, m in CASES])
def test_kernel(benchmark, record, bench_device, copy_gbs, op, mode, dtype, provider) -> None:  # noqa: ANN001
    if provider == "triton" and not (CUDA or interpreter_enabled()):
        pytest.skip("triton on the CPU needs TRITON_INTERPRET=1")
    spec = OPS[op]
    sizes = sizes_for(op, SIZES_GPU if CUDA else SIZES_SMALL)
    torch.manual_seed(0)
    call = synchronized(make_call(spec, provider, spec.make(sizes, dtype, bench_device), mode),
                        bench_device)  # fmt: skip
    for _ in range(3):  # compile and warm up outside the timed region
        call()
    benchmark.group = f"{op}-{mode}-{SHORT[dtype]}"
    benchmark.pedantic(call, rounds=50 if CUDA else 5, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    gbs = spec.traffic(sizes, torch.finfo(dtype).bits // 8, mode) / seconds / 1e9
    tflops = flops(op, sizes) / seconds / 1e12 or None
    record(provider=provider, sizes=sizes, GB_per_s=gbs, fraction_of_copy_bw=gbs / copy_gbs,
           copy_GB_per_s=copy_gbs, TFLOP_per_s=tflops)  # fmt: skip
