"""The SDXL VAE decoder at 1024 px on a GPU: diffusers eager against the engine's eager,
torch.compile and AOTInductor, in fp16 and bf16 (random weights: latency does not depend on
the values; fp16 with random weights does not overflow the way the released SDXL VAE does).

    PYTHONPATH=. python benchmarks/gpu_latent_diffusion.py --out bench-gpu/
    PYTHONPATH=. python benchmarks/gpu_latent_diffusion.py --dtypes bf16 --batches 1,4 --iters 5

For each dtype and batch size, times `decode(z)` (z: (B, 4, 128, 128)) with CUDA events around
`--iters` calls after `--warmup` calls, `--repeats` times; reports the median latency, images/s
and the peak CUDA memory of one call (torch.cuda.max_memory_allocated after a reset).
Providers:
  diffusers   diffusers.AutoencoderKL(...).decode(z).sample, eager, SDPA attention
  eager       the engine's AutoencoderKL (same weights) through its export view
  compile     torch.compile(view, mode="max-autotune-no-cudagraphs"), one graph per shape
  aoti        torch.export + AOTInductor package of the view for CUDA, in the dtype
Writes <out>/gpu_latent_diffusion.json with the device, versions and commit. Written for an
H100/H200 with torch 2.11; it has not been run (no GPU was lent while it was written).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.gpu_runtime import time_cuda

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SDXL = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
LATENT_SIDE = 128  # 1024 px


def peak_memory(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def models(dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(diffusers AutoencoderKL, the engine's AutoencoderKL) with the same random weights."""
    import diffusers  # optional: the baseline

    from engine.models import build_model

    torch.manual_seed(0)
    ours = build_model("autoencoder-kl", "sdxl").eval()
    theirs = diffusers.AutoencoderKL(**SDXL, down_block_types=("DownEncoderBlock2D",) * 4,
                                     up_block_types=("UpDecoderBlock2D",) * 4).eval()
    theirs.load_state_dict(ours.state_dict())
    return theirs.to("cuda", dtype), ours.to("cuda", dtype)


def aoti_runner(view: torch.nn.Module, z: torch.Tensor, root: Path) -> Callable:
    from export.common import dynamic_shapes

    part = view.model.export_parts()["decoder"]
    program = torch.export.export(view, (z,), dynamic_shapes=dynamic_shapes(part))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(root / "d.pt2"))
    return torch._inductor.aoti_load_package(path)


def providers(dtype: torch.dtype, z: torch.Tensor, root: Path) -> dict[str, Callable]:
    from engine.models.latent_diffusion.base import LatentDecoderView

    theirs, ours = models(dtype)
    view = LatentDecoderView(ours).eval()
    compiled = torch.compile(view, mode="max-autotune-no-cudagraphs")
    aoti = aoti_runner(view, z, root)
    zd = z.to(dtype)
    run = {"diffusers": lambda: theirs.decode(zd).sample, "eager": lambda: view(z),
           "compile": lambda: compiled(z), "aoti": lambda: aoti(z)}
    return {name: _no_grad(fn) for name, fn in run.items()}


def _no_grad(fn: Callable) -> Callable:
    def call():
        with torch.inference_mode():
            return fn()
    return call


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench-gpu")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.dtypes.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                z = torch.randn(batch, 4, LATENT_SIDE, LATENT_SIDE, device="cuda")
                for provider, fn in providers(DTYPES[name], z, Path(tmp)).items():
                    seconds = time_cuda(fn, args.iters, args.warmup, args.repeats)
                    rows.append({"dtype": name, "batch": batch, "provider": provider,
                                 "latency_ms": seconds * 1e3, "images_per_s": batch / seconds,
                                 "peak_memory_gib": peak_memory(fn) / 2**30})
                    print(json.dumps(rows[-1]), flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "commit": git_commit(), "resolution": LATENT_SIDE * 8, "results": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_latent_diffusion.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
