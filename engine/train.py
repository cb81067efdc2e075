"""Train a VAE: `python -m engine.train`.

    python -m engine.train --model mlp --dataset mnist --epochs 10 --compile --out runs/mlp
    python -m engine.train --model conv --preset conv-fmnist-2d --dataset fashion-mnist --compile
    python -m engine.train --out runs/mlp --resume                  # continue a killed run
    torchrun --nproc_per_node 2 -m engine.train --model mlp ...     # DDP (gloo on CPU)

`--compile` compiles the whole step (forward, loss, backward and optimizer update), not only
the module. Writes config.json, metrics.jsonl (one row per epoch), samples/ and recon/ grids,
and last/ + best/ checkpoints into --out; ends with a test-set evaluation (test.json).
"""

from __future__ import annotations

import argparse
import sys

import torch

import kernels
from engine import checkpoint as ckpt
from engine.data import DatasetError
from engine.losses import SCHEDULES
from engine.models.registry import FAMILIES
from engine.training import Trainer, TrainingDiverged, build_run
from engine.training.options import parse_train_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default=None, help=f"model family: {', '.join(sorted(FAMILIES))} (default mlp)")
    a("--preset", default=None, help="named preset of the family (default: the family's first)")
    a("--latent-dim", type=int, default=None, help="override the preset's latent size")
    a("--hidden-dims", type=lambda s: tuple(int(v) for v in s.split(",")), default=None,
      help="override hidden sizes, comma-separated, e.g. 512,256")
    a("--dataset", default="mnist", help="mnist | fashion-mnist | crystal CSV file(s) or dir")
    a("--data-dir", default=None, help="dataset root (else $VAE_DATA_DIR, else the cache)")
    a("--pad-to-32", action="store_true", help="pad 28x28 images to 32x32")
    a("--binarize", action="store_true", help="dynamic binarization (Bernoulli per batch)")
    a("--exclude-class", type=int, action="append", default=[],
      help="drop this label from train/val (repeatable; for anomaly detection)")
    a("--epochs", type=int, default=10)
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    a("--batch-size", type=int, default=128, help="default 128, or the preset's recipe")
    a("--eval-batch-size", type=int, default=1000)
    a("--lr", type=float, default=1e-3)
    a("--weight-decay", type=float, default=0.0)
    a("--lr-schedule", choices=("constant", "cosine"), default="constant")
    a("--warmup-steps", type=int, default=0, help="linear LR warm-up steps")
    a("--loss", choices=("bce", "mse"), default="bce", help="reconstruction loss")
    a("--objective", choices=("elbo", "tcvae", "iwae"), default="elbo")
    a("--iw-samples", type=int, default=1, help="K for --objective iwae")
    a("--beta", type=float, default=1.0, help="KL weight (end value of the schedule)")
    a("--beta-schedule", choices=SCHEDULES, default="constant")
    a("--beta-start", type=float, default=0.0)
    a("--beta-steps", type=int, default=10_000)
    a("--beta-cycles", type=int, default=4)
    a("--beta-ratio", type=float, default=0.5)
    a("--capacity-max", type=float, default=25.0, help="C_max (nats) for --beta-schedule capacity")
    a("--tc-alpha", type=float, default=1.0, help="beta-TCVAE mutual-information weight")
    a("--tc-gamma", type=float, default=1.0, help="beta-TCVAE dimension-wise KL weight")
    a("--compile", action="store_true", help="torch.compile the whole training step")
    a("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune")
    a("--amp", choices=("off", "bf16", "fp16"), default="off")
    a("--ema", type=float, default=None, metavar="DECAY",
      help="keep an EMA of the weights (0: off; default: the preset's recipe)")
    a("--grad-clip", type=float, default=None, help="clip the gradient norm to this value")
    a("--kernels", choices=("auto", "triton", "torch"), default="auto",
      help="fused Triton kernels (auto: on CUDA) or the PyTorch reference")
    a("--seed", type=int, default=0)
    a("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    a("--out", default=None, help="run directory (default runs/<model>-<time>)")
    a("--resume", action="store_true", help="continue from --out's last checkpoint")
    a("--overwrite", action="store_true",
      help="replace the run in --out (its checkpoints, metrics and export are deleted)")
    a("--ckpt-every", type=int, default=0, help="also checkpoint every N steps (0: per epoch)")
    a("--log-every", type=int, default=20, help="steps between progress/NaN checks")
    a("--num-workers", type=int, default=0, help="loader workers (crystal data)")
    a("--max-atoms", type=int, default=20, help="crystal: largest structure kept")
    a("--niggli", action="store_true", help="crystal: Niggli-reduce structures")
    a("--augment-translate", action="store_true", help="crystal: random translations")
    a("--no-progress", action="store_true", help="disable the tqdm progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_train_args(build_parser, argv)
        kernels.set_backend(args.kernels)
        run = build_run(args)
        Trainer(run).fit()
    except (DatasetError, ckpt.CheckpointError, TrainingDiverged, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full --out: the checkpoints already there are kept
        print(f"error: {ckpt.describe_os_error(e)}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:  # a --batch-size too large for the GPU
        fix = ("lower --batch-size / --eval-batch-size or try --amp bf16; the checkpoints already"
               " saved are intact (--resume continues from the last)")
        print(f"error: {ckpt.describe_out_of_memory(e, fix)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
