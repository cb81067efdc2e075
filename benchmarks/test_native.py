"""Per-call decode latency: the C++ runner `vae_sample` vs the Python runtime, same `.pt2`, CPU.

    pytest benchmarks/test_native.py --benchmark-only --benchmark-columns=min,median,mean,max,rounds
    VAE_NATIVE_BUILD_DIR=build pytest benchmarks/test_native.py --benchmark-only   # reuse a build

Subject: the default MNIST MLP decoder (mlp-mnist: z 20 -> 400 -> 784, sigmoid), random weights,
exported by `python -m export.aoti --device cpu`. Providers, each timing one decode call at a time
(`rounds` calls of `iterations=1`, median reported), with 1 intra-op thread on both sides so that
the 2 shared cores of the CI machine do not make OpenMP spin-waits dominate:

  sampler     engine.runtime.Sampler.decode(z) (its batch-1 fast path: shape/dtype check, run)
  aoti        torch._inductor.aoti_load_package(pt2)(z) (pytree flatten/unflatten per call)
  vae_sample  the C++ binary's --repeat R mode: R loader.run() calls timed with steady_clock
              inside the process; its per-call times are fed to pytest-benchmark's statistics.

Inputs are already on the device; outputs are not copied. Groups: native-decode_b<B>-fp32.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "native"))
import test_vae_sample as native_tests  # noqa: E402
from make_package import make_package  # noqa: E402
from parity import run_binary  # noqa: E402

native_build = native_tests.native_build  # session fixtures: one build shared with the tests
binary = native_tests.binary
ROUNDS = {1: 2000, 256: 200}
THREADS = 1


@pytest.fixture(scope="module")
def mnist_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_package(tmp_path_factory.mktemp("bench_pkg"), hidden=400, latent=20)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _python_call(provider: str, pt2: Path):
    if provider == "sampler":
        from engine.runtime import Sampler

        return Sampler.load(str(pt2)).decode
    return torch._inductor.aoti_load_package(str(pt2))


def _feed_external_times(benchmark, seconds: list[float]) -> None:
    """Give pytest-benchmark per-call times measured elsewhere (inside the C++ process).

    Uses the fixture's `_make_stats`, the hook its own pedantic() uses; skips if it is gone."""
    benchmark._mode = "external timings (vae_sample --repeat)"  # marks the fixture as used
    if getattr(benchmark, "disabled", False):
        return
    if not hasattr(benchmark, "_make_stats"):
        pytest.skip("this pytest-benchmark has no _make_stats; C++ medians are in extra_info")
    stats = benchmark._make_stats(1)
    for s in seconds:
        stats.update(s)


@pytest.mark.parametrize("batch", [1, 256])
@pytest.mark.parametrize("provider", ["sampler", "aoti", "vae_sample"])
def test_decode_latency(benchmark, record, one_thread, mnist_pt2: Path, binary: Path,
                        provider: str, batch: int) -> None:
    benchmark.group = f"native-decode_b{batch}-fp32"
    rounds = ROUNDS[batch]
    if provider == "vae_sample":
        proc = run_binary(binary, mnist_pt2, "--n", str(batch), "--batch-size", str(batch),
                          "--repeat", str(rounds), "--warmup", "50", "--threads", str(THREADS),
                          timeout=600)
        assert proc.returncode == 0, proc.stderr
        timing = json.loads(proc.stdout)
        times = [t / 1e3 for t in timing.pop("times_ms")]
        _feed_external_times(benchmark, times)
        median_s = timing["median_ms"] / 1e3
        record(cpp=timing)
    else:
        decode = _python_call(provider, mnist_pt2)
        z = torch.randn(batch, 20)
        with torch.no_grad():
            benchmark.pedantic(decode, args=(z,), rounds=rounds, iterations=1, warmup_rounds=50)
            median_s = benchmark.stats.stats.median if benchmark.stats else float("nan")
    record(provider=provider, batch=batch, threads=THREADS, median_us=median_s * 1e6,
           images_per_s=batch / median_s)
