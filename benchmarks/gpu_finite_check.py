"""What the GPU finite check of `Sampler.decode` costs (issue 16): check_finite=True vs False.

    PYTHONPATH=. python benchmarks/gpu_finite_check.py --out bench-gpu/

On a GPU, decode() refuses outputs that hold NaN/inf with one float64 sum per output and one
device sync (engine.runtime.types.device_outputs_finite). Two timings per subject, provider
and batch, each the median of `--repeats` runs of `--iters` calls:
  latency    each call followed by torch.cuda.synchronize() (the caller needs the images):
             the check adds a reduction kernel; its sync replaces the caller's
  pipelined  calls back to back, one sync at the end (CUDA events): the check's sync per call
             stops the host from queueing the next call while the GPU runs this one
Writes <out>/gpu_finite_check.json and .md with the device, versions and commit. Needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu_runtime import build, environment, time_cuda

PLAN = {"mlp": {"eager": (1, 256, 4096), "compile": (1, 256)}, "conv": {"eager": (1, 256, 4096)}}


def time_latency(fn, iters: int, warmup: int, repeats: int) -> float:
    """Median seconds per call, each call followed by a device sync."""
    for _ in range(warmup):
        fn()
        torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
            torch.cuda.synchronize()
        per_call.append((time.perf_counter() - start) / iters)
    return statistics.median(per_call)


def measure(run: Path, latent: int, provider: str, batch: int, args) -> dict:
    from engine.runtime import Sampler

    z = torch.randn(batch, latent, device="cuda")
    row = {"provider": provider, "batch": batch}
    loaded = Sampler.load(run, backend=provider, device="cuda")
    for check in (False, True):  # one backend (one compile) for both
        s = Sampler(loaded.backend, loaded.artifact, check_finite=check)
        fn = lambda s=s: s.decode(z)  # noqa: E731
        on = "on" if check else "off"
        row[f"latency_us_{on}"] = time_latency(fn, args.iters, args.warmup, args.repeats) * 1e6
        row[f"pipelined_us_{on}"] = time_cuda(fn, args.iters, args.warmup, args.repeats) * 1e6
    row["latency_ratio"] = row["latency_us_on"] / row["latency_us_off"]
    row["pipelined_ratio"] = row["pipelined_us_on"] / row["pipelined_us_off"]
    return row


def markdown(env: dict[str, str], rows: list[dict]) -> str:
    lines = [f"# Cost of the GPU finite check of decode() on {env['device']}", "",
             ", ".join(f"{k} {v}" for k, v in env.items() if k != "device"), "",
             "| subject | provider | batch | latency off (us) | on (us) | ratio |"
             " pipelined off (us) | on (us) | ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['subject']} | {r['provider']} | {r['batch']} | {r['latency_us_off']:.1f} |"
              f" {r['latency_us_on']:.1f} | {r['latency_ratio']:.2f} | {r['pipelined_us_off']:.1f}"
              f" | {r['pipelined_us_on']:.1f} | {r['pipelined_ratio']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for gpu_finite_check.json / .md")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: gpu_finite_check.py needs a CUDA GPU", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for subject, providers in PLAN.items():
            run, _, latent = build(subject, Path(tmp))
            for provider, batches in providers.items():
                for batch in batches:
                    try:  # one failure costs its row, not the device time of the others
                        row = measure(run, latent, provider, batch, args)
                    except Exception as e:  # noqa: BLE001
                        print(f"error: {subject} {provider} batch {batch}: {e!r}", flush=True)
                        continue
                    rows.append({"subject": f"{subject}_decoder", **row})
                    print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    (out / "gpu_finite_check.json").write_text(
        json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    (out / "gpu_finite_check.md").write_text(markdown(env, rows))
    print(f"wrote {out / 'gpu_finite_check.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
