"""Peak memory and error of the exact tiled decode, untiled and diffusers' tiling side by side.

    PYTHONPATH=. python benchmarks/ld_tiling_memory.py                    # ~3 min on 2 CPU cores
    PYTHONPATH=. python benchmarks/ld_tiling_memory.py --latent 64 --layers 2   # full SD, 512 px

The model is diffusers' AutoencoderKL with SD's widths (128, 256, 512, 512), 32 GroupNorm
groups, `--layers` resnets per block, every parameter jittered; the latent is fresh N(0, 1).
Three decodes of the same latent: untiled `vae.decode(z)`, ours `tiled_decode(vae, z, tile)`,
and diffusers' `enable_tiling()` with tiles of the same latent size (25% overlap, blended).

Peak memory, as measured here on the CPU (host and device are one memory):
  live_bytes   a TorchDispatchMode adds the bytes of each storage an aten op allocates during
               the call (an output sharing no storage with an input) and subtracts them when the
               storage is freed; the figure is the peak of that sum. It counts activations, not
               the allocator's own workspaces (oneDNN scratch) or fragmentation; weights and
               the input, allocated before, are not counted.
  tiled_host_working_set   the same count for offload="host" with the parked maps allocated
               through numpy (no aten op, so not counted): the memory a GPU would hold, since on
               a GPU those maps live in host memory.
  rss_peak     the process's peak resident set (VmHWM, reset through /proc/self/clear_refs just
               before the call) minus its resident set just before, each decode in a fresh
               subprocess: what the OS saw, allocator and all. Ours runs with offload="none" here.
On a CUDA machine, add --cuda to also report torch.cuda.max_memory_allocated (untiled vs ours
with offload="host", latent and image on the host).
Writes docs/results/ld_tiling_memory_<latent>.json (--out to change).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks.conftest import device_name, git_commit, versions
from engine.checkpoint import atomic_write_json
from engine.models.tiling import stages, tiled_decode

REPO = Path(__file__).resolve().parents[1]
SD_CHANNELS = (128, 256, 512, 512)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated by aten ops inside the mode, alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if key in inputs or key in self._seen or nbytes == 0:
                continue
            self._seen.add(key)
            self.live += nbytes
            weakref.finalize(storage, self._freed, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def build_vae(layers: int, seed: int) -> torch.nn.Module:
    from diffusers import AutoencoderKL  # optional dependency, the untiled reference

    torch.manual_seed(seed)
    n = len(SD_CHANNELS)
    vae = AutoencoderKL(block_out_channels=SD_CHANNELS, layers_per_block=layers,
                        down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, norm_num_groups=32)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae.eval()


def decoders(vae: torch.nn.Module, tile: int) -> dict:
    """The three decodes, each a function of z."""
    def untiled(z):
        with torch.no_grad():
            return vae.decode(z).sample

    def diffusers_tiling(z):
        vae.enable_tiling()
        vae.tile_latent_min_size, vae.tile_sample_min_size = tile, tile * 8
        try:
            return untiled(z)
        finally:
            vae.disable_tiling()

    return {"untiled": untiled, "tiled": lambda z: tiled_decode(vae, z, tile, offload="none"),
            "diffusers_tiling": diffusers_tiling}


def _numpy_parked(shape, dtype, device, parked):
    """Parked maps through numpy, which the LiveBytes mode does not see (module docstring)."""
    if not parked:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(shape, dtype=np.float32))


def measure_live_bytes(vae, z: torch.Tensor, tile: int) -> dict:
    out, images = {}, {}
    for name, fn in decoders(vae, tile).items():
        start = time.perf_counter()
        with LiveBytes() as mode:
            images[name] = fn(z)
        out[name] = {"live_bytes": mode.peak, "seconds": round(time.perf_counter() - start, 2)}
    allocate = stages.allocate_map
    stages.allocate_map = _numpy_parked
    try:
        with LiveBytes() as mode:
            host = tiled_decode(vae, z, tile, offload="host")
    finally:
        stages.allocate_map = allocate
    out["tiled_host_working_set"] = {"live_bytes": mode.peak}
    ref = images["untiled"]
    errors = {name: (img - ref).abs().max().item() for name, img in images.items()}
    errors["tiled_host"] = (host - ref).abs().max().item()
    return {"peaks": out, "max_abs_err": errors, "image_max_abs": ref.abs().max().item()}


def _status(key: str) -> int:
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def rss_child(args: argparse.Namespace) -> int:
    """In a fresh process: the peak RSS growth of one decode (printed as JSON)."""
    vae = build_vae(args.layers, args.seed)
    z = torch.randn(1, 4, args.latent, args.latent)
    fn = decoders(vae, args.tile)[args.rss_child]
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    fn(z)
    print(json.dumps({"rss_peak": _status("VmHWM") - before}))
    return 0


def measure_rss(args: argparse.Namespace) -> dict:
    out = {}
    for mode in ("untiled", "tiled"):
        cmd = [sys.executable, __file__, "--rss-child", mode, "--latent", str(args.latent),
               "--layers", str(args.layers), "--tile", str(args.tile), "--seed", str(args.seed),
               "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])["rss_peak"]
    return out


def measure_cuda(vae, z: torch.Tensor, tile: int) -> dict:
    vae = vae.cuda()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        ref = vae.decode(z.cuda()).sample
    untiled = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = tiled_decode(vae, z, tile, offload="host")
    tiled = torch.cuda.max_memory_allocated()
    return {"device": device_name("cuda"), "untiled_max_allocated": untiled,
            "tiled_host_max_allocated": tiled, "ratio": tiled / untiled,
            "max_abs_err": (out.cuda() - ref).abs().max().item()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=48, help="latent side (image = 8x)")
    parser.add_argument("--layers", type=int, default=1, help="resnets per block (SD: 2)")
    parser.add_argument("--tile", type=int, default=16, help="tile side in latent pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: small tile convs do not wait on each other)")
    parser.add_argument("--cuda", action="store_true", help="also measure on the GPU")
    parser.add_argument("--out", type=Path, help="JSON to write "
                        "(default docs/results/ld_tiling_memory_<latent>.json)")
    parser.add_argument("--rss-child", choices=("untiled", "tiled"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_child:
        return rss_child(args)
    vae = build_vae(args.layers, args.seed)
    z = torch.randn(1, 4, args.latent, args.latent)
    result = {"config": {"block_out_channels": SD_CHANNELS, "layers_per_block": args.layers,
                         "norm_num_groups": 32, "latent": [1, 4, args.latent, args.latent],
                         "tile": args.tile, "image": 8 * args.latent},
              "meta": {"device": device_name(), "commit": git_commit(),
                       "threads": torch.get_num_threads(), **versions()}}
    result.update(measure_live_bytes(vae, z, args.tile))
    result["rss_peak"] = measure_rss(args)
    peaks = {k: v["live_bytes"] for k, v in result["peaks"].items()}
    result["ratios"] = {
        "live_bytes_tiled_over_untiled": peaks["tiled"] / peaks["untiled"],
        "working_set_host_over_untiled": peaks["tiled_host_working_set"] / peaks["untiled"],
        "rss_tiled_over_untiled": result["rss_peak"]["tiled"] / result["rss_peak"]["untiled"]}
    if args.cuda:
        result["cuda"] = measure_cuda(vae, z, args.tile)
    atomic_write_json(args.out or REPO / f"docs/results/ld_tiling_memory_{args.latent}.json",
                      result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
