"""Decoder latency through the runtime: eager PyTorch, bare ONNX Runtime, Sampler over ONNX
Runtime, and AOTInductor (Sampler over a .pt2), for the MLP and Conv decoders, batch 1 and 256.

    .venv/bin/python -m pytest benchmarks/test_runtime.py --benchmark-only

Groups: <subject>-<mode>-<dtype>, e.g. `mlp_decoder-b1-fp32`; the provider is the parameter.
Each timed call decodes one pre-drawn latent batch on the CPU (these benchmarks are CPU-only;
benchmarks/gpu_runtime.py times the GPU). Providers:
  eager                PyTorch, the exported decoder module under inference_mode.
  onnxruntime-file     a plain InferenceSession on decoder.onnx as exported, public `run`:
                       what a user gets from ONNX Runtime without this runtime.
  onnxruntime-bare     public `InferenceSession.run` on the Sampler's *own* session (the graph
                       rewritten for the CPU, engine.runtime.ort_cpu): the floor the Sampler's
                       overhead is measured against (acceptance: Sampler within 1.2x of it at
                       batch 1). Same session, because separate sessions of one model differ by
                       as much as the overhead: eight MLP sessions, timed interleaved, ranged
                       21.2-23.6 us at batch 1 on this VM.
  sampler-onnxruntime  Sampler.decode over ONNX Runtime (acceptance: >= 3x eager at batch 1).
  aoti                 Sampler.decode over an AOTInductor .pt2 (slow to compile: marked slow).
All get the same thread count. extra_info carries images/s, device, versions, commit.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

# Every provider runs with the same thread count. The default is 1: the development machines
# have 2 cores shared by several jobs, and 2 OpenMP threads under that load collapse (a Conv
# decode at batch 1 took 163 ms with 2 threads vs 1.8 ms with 1, measured here).
THREADS = int(os.environ.get("VAE_BENCH_THREADS", "1"))

SUBJECTS = {"mlp_decoder": ("mlp", "mlp-mnist"), "conv_decoder": ("conv", "conv-mnist")}
PROVIDERS = ["eager", "onnxruntime-file", "onnxruntime-bare", "sampler-onnxruntime",
             pytest.param("aoti", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """subject -> run dir with export/decoder.onnx (and decoder.pt2 when asked for)."""
    from engine.checkpoint import save
    from engine.models import build_model
    from export.onnx import export_onnx

    root = tmp_path_factory.mktemp("bench")
    runs: dict[str, object] = {}

    def get(subject: str, aoti: bool = False):
        if subject not in runs:
            family, preset = SUBJECTS[subject]
            torch.manual_seed(0)
            run = root / subject
            save(run / "last", build_model(family, preset=preset).eval())
            export_onnx(run, parts="decoder", batches=(1, 7))
            runs[subject] = run
        run = runs[subject]
        if aoti and not (run / "export" / "decoder.pt2").exists():
            from export.aoti import export_aoti

            export_aoti(run, batches=(1, 7))
        return run

    return get


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield THREADS
    torch.set_num_threads(before)


@functools.cache
def _onnx_sampler(run):
    """One Sampler (and so one ORT session) per exported decoder, shared by the ORT providers."""
    from engine.runtime import Sampler

    return Sampler.load(run / "export" / "decoder.onnx", threads=THREADS)


def _callable(provider: str, run, z: torch.Tensor):
    from engine.runtime import Sampler

    if provider == "eager":
        from engine.checkpoint import load_model

        view = load_model(run)[0].export_parts()["decoder"].module.eval()

        def eager():
            with torch.inference_mode():
                return view(z)

        return eager
    if provider == "onnxruntime-file":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = THREADS, 1
        session = ort.InferenceSession(str(run / "export" / "decoder.onnx"), opts,
                                       providers=["CPUExecutionProvider"])
        feed = {"z": z.numpy()}
        return lambda: session.run(None, feed)
    if provider == "onnxruntime-bare":
        session = _onnx_sampler(run).backend.session  # a plain ort.InferenceSession
        assert session.get_providers() == ["CPUExecutionProvider"]
        feed = {"z": z.numpy()}
        return lambda: session.run(None, feed)
    if provider == "sampler-onnxruntime":
        sampler = _onnx_sampler(run)
        return lambda: sampler.decode(z)
    sampler = Sampler.load(run / "export" / "decoder.pt2")
    return lambda: sampler.decode(z)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", [1, 256])
@pytest.mark.parametrize("subject", list(SUBJECTS))
def test_decode(benchmark, record, exported, threads, subject, batch, provider):
    run = exported(subject, aoti=provider == "aoti")
    latent = {"mlp_decoder": 20, "conv_decoder": 128}[subject]
    z = torch.randn(batch, latent, generator=torch.Generator().manual_seed(0))
    fn = _callable(provider, run, z)
    benchmark.group = f"{subject}-b{batch}-fp32"
    benchmark.extra_info.update(provider=provider, batch=batch, threads=threads)
    out = benchmark(fn)
    out = out[0] if isinstance(out, list) else out
    assert tuple(out.shape) == (batch, 1, 28, 28)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        record(median_ms=median * 1e3, images_per_second=batch / median)
