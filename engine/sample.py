"""Sample images from a trained or exported VAE and save them as a grid.

    python -m engine.sample runs/mnist/export --n 64 --out grid.png          # `random` is default
    python -m engine.sample random runs/mnist/export/decoder.onnx --n 64 --seed 0 --out g.png
    python -m engine.sample runs/mnist --backend eager --device cpu --batch-size 16
    python -m engine.sample runs/cvae/export --labels 3 --out threes.png      # conditional

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


def _random(args: argparse.Namespace) -> int:
    sampler = load_sampler(args)
    images = sampler.sample(args.n, batch_size=args.batch_size, seed=args.seed,
                            labels=parse_labels(args.labels, args.n))
    nrow = args.nrow or max(1, round(args.n ** 0.5))
    path = save_grid(images, args.out, nrow)
    info = sampler.info
    print(f"wrote {args.n} samples to {path} ({info.backend}, {info.device}, {info.precision})")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "random": (_random_args, _random),
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
    from engine.runtime import SamplerError

    try:
        return COMMANDS[args.command][1](args)
    except (SamplerError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
