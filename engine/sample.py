"""Sample images from a trained or exported VAE and save them as a grid.

    python -m engine.sample runs/mnist/export --n 64 --out grid.png          # `random` is default
    python -m engine.sample random runs/mnist/export/decoder.onnx --n 64 --seed 0 --out g.png
    python -m engine.sample runs/mnist --backend eager --device cpu --batch-size 16
    python -m engine.sample runs/cvae/export --labels 3 --out threes.png      # conditional

Latent-space subcommands (engine.analysis.latent); each writes a PNG and, with --save-tensors,
the raw tensors (the decoded images, plus labels for reconstruct) to a .safetensors file beside it:

    python -m engine.sample grid runs/fmnist2d --dims 0 1 --range -3 3 --n 20 --out grid.png
    python -m engine.sample traverse runs/mlp --index 0 --k 3 --steps 9 --out trav.png
    python -m engine.sample interpolate runs/mlp --indices 0 1 --steps 10 --method slerp
    python -m engine.sample reconstruct runs/mlp --n 8 --out recon.png
    python -m engine.sample conditional runs/cvae --per-class 10 --out classes.png

Latent-diffusion VAEs (SD 1.x/SDXL/SD3/FLUX, TAESD; engine.analysis.latent_diffusion): decode
latents to one PNG per image, or encode images to latents (key "latents", in the diffusion
model's convention (z - shift) * scaling; `decode --scaled` undoes it):

    python -m engine.sample decode latents.safetensors --vae sdxl/vae --scaled --out images/
    python -m engine.sample decode z.npy --vae ae.safetensors --config flux --tile 64 --out out/
    python -m engine.sample encode a.png b.png --vae taesd/ --out latents.safetensors

grid and conditional only decode, so they also run on exported artifacts; traverse,
interpolate and reconstruct encode test images (a checkpoint, or an export with an encoder).
Bad arguments (dims out of range, steps < 2, conditional on an unconditional model, an
unknown artifact) end with a one-line `error: ...` and exit code 2.

ARTIFACT is anything `engine.runtime.Sampler.load` opens: an .onnx / .engine / .pt2 file, an
export directory (manifest.json) or a checkpoint / run directory. Subcommands live in COMMANDS
(name -> (add_arguments, run)); a new one registers there and gets the shared arguments from
`add_sampler_arguments`. The grid is written atomically (temp file, then os.replace).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

import torch

from engine.analysis.latent import (
    INTERPOLATIONS,
    check_dims,
    conditional_images,
    grid_images,
    interpolate_images,
    label_tensor,
    load_latent_model,
    reconstruct_images,
    require_gaussian_latent,
    split_images,
    traverse_images,
)
from engine.analysis.latent_diffusion import (
    decode_to_pngs,
    encode_images,
    encoded_metadata,
    load_vae,
    read_latents,
    unscale,
    write_latents,
)
from engine.analysis.outputs import parse_labels, save_grid, save_tensors
from engine.checkpoint import CheckpointError, describe_os_error, describe_out_of_memory
from engine.data import DatasetError
from engine.runtime import Sampler, SamplerError
from engine.runtime.checks import SEEDS

DEFAULT_COMMAND = "random"


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    """ARTIFACT, --backend, --device, --compile, --batch-size, --seed: shared by subcommands."""
    p.add_argument("artifact", help="export dir, .onnx/.engine/.pt2 file, or checkpoint/run dir")
    p.add_argument("--backend", default=None,
                   help="onnxruntime, tensorrt, aoti, eager or compile (default: from artifact)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the backend's choice)")
    p.add_argument("--compile", action="store_true", help="torch.compile (eager backend)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)


def load_sampler(args: argparse.Namespace) -> Sampler:
    return Sampler.load(args.artifact, backend=args.backend, device=args.device,
                        compile=args.compile)


# --- subcommands ---------------------------------------------------------------------------------
def _random_args(p: argparse.ArgumentParser) -> None:
    add_sampler_arguments(p)
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--out", default="samples.png", help="output image (png/jpg)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default sqrt n)")
    p.add_argument("--labels", default=None, help="class for conditional models: 3 or 0,1,2,...")
    p.add_argument("--save-tensors", action="store_true", help="also write OUT.safetensors")


def _random(args: argparse.Namespace) -> int:
    sampler = load_sampler(args)
    images = sampler.sample(args.n, batch_size=args.batch_size, seed=args.seed,
                            labels=parse_labels(args.labels, args.n))
    nrow = args.nrow or max(1, round(args.n ** 0.5))
    path = save_grid(images, args.out, nrow)
    if args.save_tensors:
        save_tensors(path, images=images)
    info = sampler.info
    print(f"wrote {args.n} samples to {path} ({info.backend}, {info.device}, {info.precision})")
    return 0


def _latent_common(p: argparse.ArgumentParser, out: str) -> None:
    add_sampler_arguments(p)
    p.add_argument("--out", default=out, help="output image (png)")
    p.add_argument("--save-tensors", action="store_true", help="also write OUT.safetensors")
    p.add_argument("--label", type=int, default=None, help="class, for a conditional model")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="test", help="train | val | test (default test)")
    p.add_argument("--dataset", default=None, help="default: the checkpoint's (else mnist)")
    p.add_argument("--data-dir", default=None, help="dataset root (else $VAE_DATA_DIR)")


def _grid_args(p: argparse.ArgumentParser) -> None:
    _latent_common(p, "grid.png")
    p.add_argument("--dims", type=int, nargs=2, default=(0, 1), metavar=("I", "J"))
    p.add_argument("--range", type=float, nargs=2, default=(-3.0, 3.0), metavar=("LO", "HI"))
    p.add_argument("--n", type=int, default=15, help="grid points per side")


def _traverse_args(p: argparse.ArgumentParser) -> None:
    _latent_common(p, "traverse.png")
    _data_args(p)
    p.add_argument("--index", type=int, default=0, help="the test image whose code is swept")
    p.add_argument("--dims", type=int, nargs="+", default=None, help="dims to sweep (all)")
    p.add_argument("--k", type=float, default=3.0, help="sweep each dim over [-k, k]")
    p.add_argument("--steps", type=int, default=9)


def _interpolate_args(p: argparse.ArgumentParser) -> None:
    _latent_common(p, "interpolate.png")
    _data_args(p)
    p.add_argument("--indices", type=int, nargs=2, default=(0, 1), metavar=("A", "B"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--method", default="lerp", help="lerp or slerp")


def _reconstruct_args(p: argparse.ArgumentParser) -> None:
    _latent_common(p, "reconstruct.png")
    _data_args(p)
    p.add_argument("--n", type=int, default=8, help="number of test images")
    p.add_argument("--index", type=int, default=0, help="first test image")


def _conditional_args(p: argparse.ArgumentParser) -> None:
    _latent_common(p, "conditional.png")
    p.add_argument("--per-class", type=int, default=10, help="samples per class (row)")


def _latent_model(args: argparse.Namespace):
    return load_latent_model(args.artifact, backend=args.backend, device=args.device,
                             compile=args.compile)


def _test_images(model, cfg: dict, args: argparse.Namespace, idx: list[int]):
    return split_images(model, cfg, idx, split=args.split, dataset=args.dataset,
                       data_dir=args.data_dir)


def _finish(args: argparse.Namespace, images, nrow: int, **tensors) -> int:
    path = save_grid(images, args.out, nrow)
    if args.save_tensors:
        save_tensors(path, images=images, **tensors)
    print(f"wrote {images.shape[0]} images to {path}")
    return 0


def _grid(args: argparse.Namespace) -> int:
    model, _ = _latent_model(args)
    lo, hi = args.range
    images = grid_images(model, args.dims, args.n, lo, hi, label_tensor(model, args.label))
    return _finish(args, images, args.n)


def _traverse(args: argparse.Namespace) -> int:
    if args.steps < 2 or not (math.isfinite(args.k) and args.k > 0):
        raise ValueError(f"traverse needs --steps >= 2 and a finite --k > 0, got {args.steps},"
                         f" {args.k}")
    model, cfg = _latent_model(args)
    latent_dim = require_gaussian_latent(model, "traverse")
    if args.dims is not None:
        check_dims(args.dims, latent_dim, "--dims")
    x, y = _test_images(model, cfg, args, [args.index])
    dims = args.dims if args.dims is not None else list(range(latent_dim))
    images = traverse_images(model, x, label_tensor(model, args.label, y), dims, args.k, args.steps)
    return _finish(args, images, args.steps)


def _interpolate(args: argparse.Namespace) -> int:
    if args.method not in INTERPOLATIONS:
        raise ValueError(f"--method must be one of {', '.join(INTERPOLATIONS)},"
                         f" got {args.method!r}")
    if args.steps < 2:
        raise ValueError(f"--steps must be >= 2 (the two endpoints), got {args.steps}")
    model, cfg = _latent_model(args)
    require_gaussian_latent(model, "interpolate")
    x, y = _test_images(model, cfg, args, list(args.indices))
    images = interpolate_images(model, x[:1], x[1:], args.steps, args.method,
                                label_tensor(model, args.label, y))
    return _finish(args, images, args.steps)


def _reconstruct(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    model, cfg = _latent_model(args)
    x, y = _test_images(model, cfg, args, list(range(args.index, args.index + args.n)))
    if args.label is not None:
        raise ValueError("reconstruct uses each test image's own label; drop --label")
    return _finish(args, reconstruct_images(model, x, y), args.n, labels=y)


def _conditional(args: argparse.Namespace) -> int:
    if args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    model, _ = _latent_model(args)
    images = conditional_images(model, args.per_class, args.seed or 0)
    return _finish(args, images, args.per_class)


def _vae_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", required=True, help="diffusers folder, .safetensors VAE, TAESD pair,"
                   " or an export directory / .onnx / .pt2 of one")
    p.add_argument("--config", default=None, help="preset when the file cannot tell: sd15, sdxl,"
                   " sd3, flux, taesd, taesdxl, taef1")
    p.add_argument("--backend", default=None, help="onnxruntime, aoti, eager or compile")
    p.add_argument("--device", default=None, help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="fp32 (default), fp16 or bf16 (PyTorch model)")
    p.add_argument("--tile", type=int, default=None, metavar="LATENT_PX",
                   help="tiled decode/encode, tiles of this many latent pixels")
    p.add_argument("--tile-overlap", type=int, default=8, metavar="LATENT_PX")


def _decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("latents", help="latents file: .safetensors (one tensor or 'latents') or .npy")
    _vae_args(p)
    p.add_argument("--scaled", action="store_true", help="latents are a diffusion model's:"
                   " divide by scaling_factor and add shift_factor first")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", default="decoded", help="output directory (one PNG per image)")


def _encode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files of one size (multiples of 8)")
    _vae_args(p)
    p.add_argument("--sample", action="store_true", help="a posterior draw instead of the mean")
    p.add_argument("--seed", type=int, default=None, help="seed of --sample")
    p.add_argument("--out", default="latents.safetensors")


def _load_vae(args: argparse.Namespace):
    return load_vae(args.vae, args.backend, args.device, args.dtype, args.config, args.tile,
                    args.tile_overlap)


def _decode(args: argparse.Namespace) -> int:
    latents, meta = read_latents(args.latents)
    if meta.get("scaled") == "true" and not args.scaled:
        raise ValueError(f"{args.latents} holds scaled latents (its metadata says so, as"
                         " engine.sample encode writes them): pass --scaled")
    vae = _load_vae(args)
    z = unscale(latents, vae) if args.scaled else latents
    written = decode_to_pngs(vae, z, args.out, args.batch_size)
    print(f"wrote {len(written)} images to {args.out} ({vae.label})")
    return 0


def _encode(args: argparse.Namespace) -> int:
    vae = _load_vae(args)
    latents = encode_images(vae, args.images, args.sample, args.seed)
    path = write_latents(args.out, latents, encoded_metadata(vae, args.vae, args.sample,
                                                             args.seed))
    print(f"wrote latents {tuple(latents.shape)} to {path} ({vae.label})")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "random": (_random_args, _random),
    "grid": (_grid_args, (_grid)),
    "traverse": (_traverse_args, (_traverse)),
    "interpolate": (_interpolate_args, (_interpolate)),
    "reconstruct": (_reconstruct_args, (_reconstruct)),
    "conditional": (_conditional_args, (_conditional)),
    "decode": (_decode_args, _decode),
    "encode": (_encode_args, _encode),
}


# flag -> smallest value it takes (a count, a size); --seed: SEEDS, torch's seed range.
MINIMUM = {"n": 1, "batch_size": 1, "nrow": 1, "tile": 1, "tile_overlap": 0, "per_class": 1}


def check_flags(args: argparse.Namespace) -> None:
    """Refuse out-of-range counts, sizes and seeds before anything is loaded or written."""
    for name, least in MINIMUM.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    seed = getattr(args, "seed", None)
    if seed is not None and seed not in SEEDS:
        raise ValueError(f"--seed must lie in [{SEEDS.start}, {SEEDS.stop}), got {seed}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m engine.sample",
                                 description=__doc__.split("\n")[0],
                                 epilog=f"without a subcommand, '{DEFAULT_COMMAND}' is used")
    sub = ap.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=f"{name} samples"))
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, DEFAULT_COMMAND)  # `python -m engine.sample ARTIFACT ...`
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    try:
        check_flags(args)
        return COMMANDS[args.command][1](args)
    except (SamplerError, CheckpointError, DatasetError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full --out
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:  # past the runtime's lower-bound memory check
        fix = "lower --batch-size or --n, or tile the decode (--tile 64)"
        print(f"error: {describe_out_of_memory(e, fix)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
