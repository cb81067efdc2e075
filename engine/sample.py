"""Sample images from a trained or exported VAE and save them as a grid.

    python -m engine.sample runs/mnist/export --n 64 --out grid.png          # `random` is default
    python -m engine.sample random runs/mnist/export/decoder.onnx --n 64 --seed 0 --out g.png
    python -m engine.sample runs/mnist --backend eager --device cpu --batch-size 16
    python -m engine.sample runs/cvae/export --labels 3 --out threes.png      # conditional

Latent-space subcommands (engine.latent); each writes a PNG and, with --save-tensors, the raw
tensors (the decoded images, plus labels for reconstruct) to a .safetensors file beside it:

    python -m engine.sample grid runs/fmnist2d --dims 0 1 --range -3 3 --n 20 --out grid.png
    python -m engine.sample traverse runs/mlp --index 0 --k 3 --steps 9 --out trav.png
    python -m engine.sample interpolate runs/mlp --indices 0 1 --steps 10 --method slerp
    python -m engine.sample reconstruct runs/mlp --n 8 --out recon.png
    python -m engine.sample conditional runs/cvae --per-class 10 --out classes.png

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
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

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


def load_sampler(args: argparse.Namespace):
    from engine.runtime import Sampler

    return Sampler.load(args.artifact, backend=args.backend, device=args.device,
                        compile=args.compile)


def parse_labels(text: str | None, n: int) -> torch.Tensor | int | None:
    """'3' -> 3 (all samples); '0,1,2' -> cycled over the n samples."""
    if text is None:
        return None
    values = [int(v) for v in text.split(",") if v.strip()]
    if len(values) == 1:
        return values[0]
    return torch.tensor(values, dtype=torch.int64).repeat(n // len(values) + 1)[:n]


def save_grid(images: torch.Tensor, out: str | os.PathLike, nrow: int) -> Path:
    """save_image to a temp file beside `out` (same suffix, so the format is kept), then rename."""
    from torchvision.utils import save_image

    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("the decoder's outputs are not images (B, C, H, W); use the runtime API")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{os.getpid()}{out.suffix}")
    try:
        save_image(images.detach().float().cpu().clamp(0, 1), tmp, nrow=nrow)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


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


def save_tensors(png: Path, **tensors: torch.Tensor | None) -> Path:
    """The raw tensors behind a grid, as OUT.safetensors beside OUT.png (atomic)."""
    from safetensors.torch import save_file

    path = png.with_suffix(".safetensors")
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items() if v is not None},
              str(tmp))
    os.replace(tmp, path)
    return path




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


def load_latent_model(args: argparse.Namespace):
    """(model, training config): the PyTorch model of a checkpoint/run directory, or an exported
    artifact behind engine.runtime.Sampler (engine.latent.RuntimeModel)."""
    from engine import checkpoint as ckpt
    from engine.latent import RuntimeModel

    path = Path(args.artifact)
    if not path.exists():
        raise ValueError(f"no artifact at {path}: expected a checkpoint/run directory, an export"
                         " directory or an .onnx/.pt2/.engine file")
    if path.is_dir() and not (path / "manifest.json").exists():
        model, c = ckpt.load_model(path, device=args.device or "cpu")
        return model, c.config.get("train", {})
    return RuntimeModel(load_sampler(args)), {}


def _test_images(model, cfg: dict, args: argparse.Namespace, idx: list[int]):
    from engine.evaluate import split_loader

    cfg = {**cfg, "dataset": args.dataset or cfg.get("dataset", "mnist")}
    cfg.setdefault("pad_to_32", tuple(getattr(model, "data_shape", (0,)))[-1:] == (32,))
    loader = split_loader(cfg, args.split, args.data_dir)
    n = loader.images.shape[0]
    if any(not 0 <= i < n for i in idx):
        raise ValueError(f"image indices {idx} out of range: the {args.split} split has {n}"
                         f" images (0..{n - 1})")
    i = torch.tensor(idx)
    return loader._prepare(loader.images[i]), loader.labels[i]


def _label(model, args: argparse.Namespace, y=None) -> torch.Tensor | None:
    if not getattr(model, "conditional", False):
        if args.label is not None:
            raise ValueError("--label given, but this model is unconditional")
        return None
    from engine.latent import _num_classes

    label = args.label if args.label is not None else (int(y[0]) if y is not None else 0)
    if not 0 <= label < _num_classes(model):
        raise ValueError(f"--label must be in [0, {_num_classes(model)}), got {label}")
    return torch.tensor([label])


def _finish(args: argparse.Namespace, images, nrow: int, **tensors) -> int:
    path = save_grid(images, args.out, nrow)
    if args.save_tensors:
        save_tensors(path, images=images, **tensors)
    print(f"wrote {images.shape[0]} images to {path}")
    return 0


def _grid(args: argparse.Namespace) -> int:
    from engine.latent import grid_images

    model, _ = load_latent_model(args)
    lo, hi = args.range
    images = grid_images(model, args.dims, args.n, lo, hi, _label(model, args))
    return _finish(args, images, args.n)


def _traverse(args: argparse.Namespace) -> int:
    from engine.latent import _check_dims, require_gaussian_latent, traverse_images

    if args.steps < 2 or args.k <= 0:
        raise ValueError(f"traverse needs --steps >= 2 and --k > 0, got {args.steps}, {args.k}")
    model, cfg = load_latent_model(args)
    latent_dim = require_gaussian_latent(model, "traverse")
    if args.dims is not None:
        _check_dims(args.dims, latent_dim, "--dims")
    x, y = _test_images(model, cfg, args, [args.index])
    dims = args.dims if args.dims is not None else list(range(latent_dim))
    images = traverse_images(model, x, _label(model, args, y), dims, args.k, args.steps)
    return _finish(args, images, args.steps)


def _interpolate(args: argparse.Namespace) -> int:
    from engine.latent import INTERPOLATIONS, interpolate_images, require_gaussian_latent

    if args.method not in INTERPOLATIONS:
        raise ValueError(f"--method must be one of {', '.join(INTERPOLATIONS)},"
                         f" got {args.method!r}")
    if args.steps < 2:
        raise ValueError(f"--steps must be >= 2 (the two endpoints), got {args.steps}")
    model, cfg = load_latent_model(args)
    require_gaussian_latent(model, "interpolate")
    x, y = _test_images(model, cfg, args, list(args.indices))
    images = interpolate_images(model, x[:1], x[1:], args.steps, args.method,
                                _label(model, args, y))
    return _finish(args, images, args.steps)


def _reconstruct(args: argparse.Namespace) -> int:
    from engine.latent import reconstruct_images

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    model, cfg = load_latent_model(args)
    x, y = _test_images(model, cfg, args, list(range(args.index, args.index + args.n)))
    if args.label is not None:
        raise ValueError("reconstruct uses each test image's own label; drop --label")
    return _finish(args, reconstruct_images(model, x, y), args.n, labels=y)


def _conditional(args: argparse.Namespace) -> int:
    from engine.latent import conditional_images

    if args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    model, _ = load_latent_model(args)
    images = conditional_images(model, args.per_class, args.seed or 0)
    return _finish(args, images, args.per_class)


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "random": (_random_args, _random),
    "grid": (_grid_args, (_grid)),
    "traverse": (_traverse_args, (_traverse)),
    "interpolate": (_interpolate_args, (_interpolate)),
    "reconstruct": (_reconstruct_args, (_reconstruct)),
    "conditional": (_conditional_args, (_conditional)),
}


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
    from engine.checkpoint import CheckpointError
    from engine.data import DatasetError
    from engine.runtime import SamplerError

    try:
        return COMMANDS[args.command][1](args)
    except (SamplerError, CheckpointError, DatasetError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
