"""Evaluate a checkpoint: `python -m engine.evaluate CKPT`.

    python -m engine.evaluate runs/mlp --iw-samples 1000 --out report.json
    python -m engine.evaluate runs/mlp-no3 --anomaly --holdout-class 3
    python -m engine.evaluate runs/vq                    # codebook usage, perplexity, dead codes
    python -m engine.evaluate runs/crystal --dataset data/mp_20   # -> engine.crystal.evaluate

Reports (JSON to --out, and a table on stdout), per image and averaged over the split: the ELBO
and its two parts, the IWAE_k NLL estimate (--iw-samples k, in chunks of --max-rows decoder
rows), active units and KL per latent dim, reconstruction MSE and BCE; for a VQ-VAE, codebook
usage, perplexity and dead codes. Definitions and references: engine.analysis.evaluation.
  --anomaly --holdout-class C: score = -ELBO (or -IWAE_k with --iw-samples k > 1) per image,
      ROC-AUC of class C (positive) against the rest, see engine.analysis.anomaly; with
      --anomaly-score complexity the score is corrected by a zlib code length, and with
      --anomaly-score latent-knn it is the cosine distance from the image's posterior mean to
      its --knn-k-th nearest among the training images' (the classes the model was trained on).

The data comes from the checkpoint's training config (dataset, --binarize -> the fixed
"static" binarization of the test set, --pad-to-32); --data-dir or $VAE_DATA_DIR locate it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from engine import checkpoint as ckpt
from engine.analysis.anomaly import SCORES
from engine.analysis.evaluation import SPLITS, evaluate_checkpoint, format_table, resolve_checkpoint
from engine.crystal import evaluate as crystal_evaluate
from engine.data import DatasetError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("checkpoint", help="run directory (uses best/, else last/) or checkpoint directory")
    a("--split", default="test", help="train | val | test (default test)")
    a("--iw-samples", type=int, default=1, help="k for the IWAE NLL estimate (1: ELBO only)")
    a("--max-rows", type=int, default=8192, help="decoder rows per IWAE chunk (memory bound)")
    a("--batch-size", type=int, default=500)
    a("--max-images", type=int, default=None, help="evaluate only the first N images")
    a("--anomaly", action="store_true", help="score images and report ROC-AUC")
    a("--holdout-class", type=int, default=None, help="the anomalous class for --anomaly")
    a("--anomaly-score", default="elbo", help="elbo: -ELBO (-IWAE_k with --iw-samples k);"
      " complexity: that minus a zlib code length; latent-knn: cosine distance to the k-th"
      " nearest training posterior mean (see engine.anomaly)")
    a("--knn-k", type=int, default=10, help="k for --anomaly-score latent-knn (default 10)")
    a("--knn-bank", type=int, default=None,
      help="latent-knn: use only the first N training-split images as the bank (default all)")
    a("--ema", action="store_true", help="evaluate the EMA weights when present")
    a("--data-dir", default=None, help="dataset root (else the checkpoint's, else $VAE_DATA_DIR)")
    a("--dataset", default=None, help="override the checkpoint's dataset (crystal: CSV/dir)")
    a("--crystal-split", default=None, help="evaluate a crystal model on this split")
    a("--seed", type=int, default=0)
    a("--device", default="cpu")
    a("--out", default=None, help="write the JSON report here")
    return p


def validate(args: argparse.Namespace) -> None:
    if args.split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {args.split!r}")
    if args.iw_samples < 1:
        raise ValueError(f"--iw-samples must be >= 1, got {args.iw_samples}")
    if args.max_rows < 1 or args.batch_size < 1:
        raise ValueError("--max-rows and --batch-size must be >= 1")
    if args.anomaly and args.holdout_class is None:
        raise ValueError("--anomaly needs --holdout-class C (the class treated as anomalous)")
    if args.anomaly_score not in SCORES:
        raise ValueError(f"--anomaly-score must be one of {', '.join(SCORES)}, got"
                         f" {args.anomaly_score!r}")
    if args.knn_k < 1 or (args.knn_bank is not None and args.knn_bank < 1):
        raise ValueError("--knn-k and --knn-bank must be >= 1")
    if args.holdout_class is not None and not args.anomaly:
        raise ValueError("--holdout-class only applies with --anomaly")


def delegate_crystal(args: argparse.Namespace, c: ckpt.Checkpoint) -> int:
    dataset = args.dataset or c.config.get("train", {}).get("dataset")
    argv = [str(c.path), "--dataset", str(dataset),  # c: the resolved checkpoint (best/)
            "--split", args.crystal_split or args.split, "--seed", str(args.seed)]
    if args.out:
        argv += ["--out", str(Path(args.out).with_suffix(""))]
    return int(crystal_evaluate.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate(args)
        c = ckpt.read(resolve_checkpoint(args.checkpoint), verify=False)
        if c.config.get("model", {}).get("family") == "crystal" or args.crystal_split:
            return delegate_crystal(args, c)
        report = evaluate_checkpoint(args)
        print(format_table(report))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_json(Path(args.out), report)
    except (ckpt.CheckpointError, DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full --out: an older report there is kept
        print(f"error: {ckpt.describe_os_error(e)}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:
        print(f"error: {ckpt.describe_out_of_memory(e, 'lower --batch-size')}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
