"""Decoder latency on a GPU: eager vs torch.compile(mode="reduce-overhead") vs AOTInductor.

    PYTHONPATH=. python benchmarks/gpu_runtime.py --out bench-gpu/
    PYTHONPATH=. python benchmarks/gpu_runtime.py --out bench-gpu/ --subjects mlp --batches 1,4096

For each subject (the MLP and Conv decoders of the presets, random weights: latency does not
depend on the values) and batch size, times `decode(z)` with CUDA events around `--iters` calls
(after `--warmup` calls), `--repeats` times; reports the median per-call latency and images/s.
Providers:
  eager     the export view under torch.inference_mode (what Sampler's eager backend runs)
  compile   torch.compile(mode="reduce-overhead", dynamic=False): CUDA graphs, one per batch size
  aoti      export.aoti's package compiled for CUDA, run through engine.runtime.Sampler
  ort-cuda, ort-cuda-graphs   Sampler over export.onnx's decoder on ONNX Runtime's CUDA EP,
            plain IOBinding and CUDA graphs; only when onnxruntime-gpu is importable
Writes <out>/gpu_runtime.json and <out>/gpu_runtime.md with the device, versions and commit.
Runs on torch 2.11 and 2.14; needs a CUDA GPU (exits 1 with a message otherwise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

SUBJECTS = {"mlp": ("mlp", "mlp-mnist"), "conv": ("conv", "conv-mnist")}


def time_cuda(fn: Callable[[], object], iters: int, warmup: int, repeats: int) -> float:
    """Median seconds per call: CUDA events around `iters` back-to-back calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(per_call)


def build(subject: str, root: Path) -> tuple[Path, torch.nn.Module, int]:
    """A checkpoint of the subject's preset; returns (run dir, decoder view on cuda, latent)."""
    from engine.checkpoint import load_model, save
    from engine.models import build_model

    family, preset = SUBJECTS[subject]
    torch.manual_seed(0)
    run = root / subject
    save(run / "last", build_model(family, preset=preset).eval())
    model, _ = load_model(run, device="cuda")
    return run, model.export_parts()["decoder"].module.eval(), model.latent_shape[0]


def providers(run: Path, view: torch.nn.Module, batch: int
              ) -> dict[str, Callable[[torch.Tensor], object]]:
    from engine.runtime import Sampler

    def eager(z):
        with torch.inference_mode():
            return view(z)

    compiled = torch.compile(view, mode="reduce-overhead", dynamic=False)

    def compile_(z):
        torch.compiler.cudagraph_mark_step_begin()  # outputs of the last replay may be reused
        with torch.inference_mode():
            return compiled(z)

    aoti = Sampler.load(run / "export" / "decoder.pt2", device="cuda")
    fns = {"eager": eager, "compile": compile_, "aoti": aoti.decode}
    if (run / "export" / "decoder.onnx").exists():
        onnx = run / "export" / "decoder.onnx"
        fns["ort-cuda"] = Sampler.load(onnx, device="cuda", cuda_graphs=False).decode
        fns["ort-cuda-graphs"] = Sampler.load(onnx, device="cuda").decode
    return fns


def ort_cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def check_agreement(fns: dict[str, Callable], z: torch.Tensor) -> dict[str, float]:
    """max |provider - eager| on one batch, so a fast wrong answer is visible in the report."""
    ref = fns["eager"](z).float()
    return {name: float((fn(z).float() - ref).abs().max()) for name, fn in fns.items()}


def run_subject(subject: str, root: Path, batches: list[int], args) -> list[dict]:
    from export.aoti import export_aoti

    run, view, latent = build(subject, root)
    export_aoti(run, device="cuda", batches=(1, 7))
    if ort_cuda_available():
        from export.onnx import export_onnx

        export_onnx(run, parts="decoder", batches=(1, 7))
    rows = []
    for batch in batches:
        z = torch.randn(batch, latent, device="cuda")
        fns = providers(run, view, batch)
        errors = check_agreement(fns, z)
        for name, fn in fns.items():
            seconds = time_cuda(lambda fn=fn, z=z: fn(z), args.iters, args.warmup, args.repeats)
            rows.append({"subject": f"{subject}_decoder", "provider": name, "batch": batch,
                         "latency_ms": seconds * 1e3, "images_per_second": batch / seconds,
                         "max_abs_vs_eager": errors[name]})
            print(f"{subject:5s} {name:8s} batch {batch:5d}: {seconds * 1e3:8.4f} ms"
                  f"  {batch / seconds:14,.0f} images/s")
    return rows


def environment() -> dict[str, str]:
    from benchmarks.conftest import git_commit, versions

    return {"device": torch.cuda.get_device_name(), "cuda": str(torch.version.cuda),
            "commit": git_commit(), "tf32_matmul": str(torch.backends.cuda.matmul.allow_tf32),
            **versions()}


def markdown(env: dict[str, str], rows: list[dict]) -> str:
    lines = [f"# Decoder latency on {env['device']}", "",
             ", ".join(f"{k} {v}" for k, v in env.items() if k != "device"), "",
             "| subject | provider | batch | latency (ms) | images/s | max abs vs eager |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['subject']} | {r['provider']} | {r['batch']} | {r['latency_ms']:.4f} |"
              f" {r['images_per_second']:,.0f} | {r['max_abs_vs_eager']:.1e} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for gpu_runtime.json / .md")
    ap.add_argument("--subjects", default="mlp,conv")
    ap.add_argument("--batches", default="1,4096")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (off by default)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: gpu_runtime.py needs a CUDA GPU; for the CPU use"
              " pytest benchmarks/test_runtime.py --benchmark-only", file=sys.stderr)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for subject in args.subjects.split(","):
            rows += run_subject(subject, Path(tmp), batches, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    (out / "gpu_runtime.json").write_text(json.dumps({"environment": env, "results": rows},
                                                     indent=2) + "\n")
    (out / "gpu_runtime.md").write_text(markdown(env, rows))
    print(f"wrote {out / 'gpu_runtime.json'} and {out / 'gpu_runtime.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
