"""The full SD 1.x VAE decoder (random weights) on the CPU: diffusers eager against the engine's
eager, torch.compile, ONNX Runtime and AOTInductor backends, side by side in one run.

    pytest benchmarks/test_latent_diffusion.py --benchmark-only -p no:cacheprovider \\
        --benchmark-columns=median,min,max,rounds --benchmark-group-by=group

On a shared machine add `--benchmark-timer time.process_time`: CPU seconds per decode, which
other jobs perturb far less than wall time (images_per_s then reads per CPU second).
Groups: ld-decode-sd15-256px-fp32 (a 32x32 latent, batch 1, 256 px) and
ld-decode-sd15-256px-bf16 (eager only; the error against fp32 is in extra_info). One decode
costs seconds here, so rounds are few; exports and compiles happen once per session (module
fixtures), outside the timed region. Each benchmark records its max |error| against the
diffusers fp32 output and images/s in extra_info.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import pytest
import torch

from engine.models import build_model, config_to_dict
from engine.runtime import Sampler
from engine.runtime.backends import EagerBackend
from export import aoti as aoti_export
from export import onnx as onnx_export
from export.common import model_source

diffusers = pytest.importorskip("diffusers", reason="diffusers is the baseline")

LATENT = (1, 4, 32, 32)  # 256 x 256 px
FP32 = "ld-decode-sd15-256px-fp32"
BF16 = "ld-decode-sd15-256px-bf16"
ROUNDS = dict(rounds=3, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def sd15():
    """(engine model, diffusers twin with the same weights, latent, diffusers' fp32 output)."""
    torch.manual_seed(0)
    model = build_model("autoencoder-kl", "sd15").eval()
    twin = diffusers.AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    twin.load_state_dict(model.state_dict())
    twin.eval()
    z = torch.randn(LATENT)
    with torch.inference_mode():
        reference = twin.decode(z).sample
    return model, twin, z, reference


_RUNNERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}


def _exported(model, tmp_dir, backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
    source = model_source(model, tmp_dir)
    if backend == "onnxruntime":
        written = onnx_export.export_source(source, tmp_dir, parts="decoder", batches=(1,))
    else:
        written = aoti_export.export_source(source, tmp_dir, "cpu", "decoder", batches=(1,))
    return Sampler.load(written["decoder"]).decode


def runner(provider: str, sd15, tmp_path_factory) -> Callable[[torch.Tensor], torch.Tensor]:
    """The decode callable of a provider, built once per session (compile/export untimed)."""
    if provider not in _RUNNERS:
        model, twin, z, _ = sd15
        if provider == "diffusers-eager":
            fn = lambda t: twin.decode(t).sample
        elif provider in ("eager", "compile"):
            backend = EagerBackend(tmp_path_factory.mktemp(provider), "cpu",
                                   provider == "compile",
                                   loaded=(model, config_to_dict(model.config)))
            fn = Sampler(backend, backend.path).decode
        else:
            fn = _exported(model, tmp_path_factory.mktemp(provider), provider)
        with torch.inference_mode():
            fn(z)  # compile / first-run costs stay out of the timing
        _RUNNERS[provider] = fn
    return _RUNNERS[provider]


def _run(benchmark, record, fn, z, reference, tolerance: float = 1e-3) -> None:
    def decode():
        with torch.inference_mode():
            return fn(z)

    out = benchmark.pedantic(decode, **ROUNDS)
    err = (out.float() - reference).abs().max().item()
    record(max_abs_error_vs_diffusers_fp32=err, latent=list(LATENT),
           images_per_s=1.0 / benchmark.stats.stats.median if benchmark.stats else None,
           torch_threads=torch.get_num_threads(), measured_at=time.strftime("%Y-%m-%d %H:%M"))
    assert err < tolerance, f"decode output differs from diffusers by {err}"


@pytest.mark.parametrize("provider", ["diffusers-eager", "eager", "compile", "onnxruntime",
                                      "aoti"])
def test_decode_fp32(benchmark, record, provider, sd15, tmp_path_factory):
    benchmark.group = FP32
    _, _, z, reference = sd15
    _run(benchmark, record, runner(provider, sd15, tmp_path_factory), z, reference)


@pytest.mark.parametrize("provider", ["diffusers-eager", "eager"])
def test_decode_bf16(benchmark, record, provider, sd15):
    """bf16 on a CPU without avx512_bf16/AMX is emulated: expect no speed-up there."""
    benchmark.group = BF16
    model, twin, z, reference = sd15
    net = twin if provider == "diffusers-eager" else model
    half = copy.deepcopy(net).to(torch.bfloat16)
    fn = (lambda t: half.decode(t.to(torch.bfloat16)).sample) if net is twin else half.decode
    # bf16 keeps 8 mantissa bits; through ~30 conv layers the output moves by a few percent
    _run(benchmark, record, fn, z, reference, tolerance=0.25)
