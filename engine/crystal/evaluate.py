"""Evaluate a crystal VAE: reconstruction (CDVAE protocol) and prior sampling.

    python -m engine.crystal.evaluate RUN_OR_CHECKPOINT --dataset PATH [--split test]
        [--out DIR] [--max-crystals N] [--num-samples 1000] [--workers 2] [--timeout 30]

Reconstruction: each crystal of the split is encoded, its posterior mean decoded, and the
prediction matched to the input with StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3); an
invalid prediction (no cell, volume < 0.1 A^3 or a pair closer than 0.5 A) counts as a miss.
Sampling: atom counts from the training histogram stored in the model config, z ~ N(0, I);
reports the fraction of structurally valid samples. Reconstructions and samples are written
as CIF files under out_dir/{recon,sample}/, metrics to out_dir/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from engine.checkpoint import atomic_write_json, describe_os_error, load_model
from engine.crystal.metrics import MATCHER_KW, match_structures, summarize
from engine.crystal.structures import (
    batch_to_structures,
    crystal_arrays,
    is_valid,
    make_structure,
    write_cifs,
)
from engine.data.crystals import build_crystal_data


@torch.no_grad()
def reconstruct_split(model, loader, max_crystals: int | None = None):
    """(predicted arrays, ground-truth arrays) per crystal, over the loader (in order)."""
    device = next(model.parameters()).device
    preds, gts = [], []
    for batch in loader:
        batch = batch.to(device)
        preds += crystal_arrays(model.reconstruct(batch))
        gts += crystal_arrays(batch)
        if max_crystals is not None and len(gts) >= max_crystals:
            break
    if max_crystals is not None:
        preds, gts = preds[:max_crystals], gts[:max_crystals]
    return preds, gts


def evaluate_crystal(model, data, out_dir, split: str = "test", num_workers: int = 2,
                     timeout: float = 30.0, max_crystals: int | None = None,
                     num_samples: int = 1000, seed: int = 0, write_limit: int = 200) -> dict:
    """Metrics dict; `data` is a DataBundle (its `split` loader is used) or a loader itself.

    Writes at most `write_limit` reconstructions and samples as CIFs under out_dir.
    """
    out_dir = Path(out_dir)
    loader = getattr(data, split) if hasattr(data, split) else data
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        preds, gts = reconstruct_split(model, loader, max_crystals)
        results = match_structures(preds, gts, num_workers, timeout)
        recon = summarize(results)
        recon["seconds"] = time.perf_counter() - start
        write_cifs([make_structure(*p) for p in preds[:write_limit]], out_dir / "recon", "recon")
        write_cifs([make_structure(*g) for g in gts[:write_limit]], out_dir / "recon", "input")
        sampled = batch_to_structures(model.sample(num_samples, seed=seed)) if num_samples else []
        valid = [is_valid(s) for s in sampled]
        write_cifs(sampled[:write_limit], out_dir / "sample", "sample")
    finally:
        model.train(was_training)
    metrics = {"split": split, "reconstruction": recon, "matcher": MATCHER_KW,
               "sampling": {"num_samples": len(sampled),
                            "valid_fraction": sum(valid) / max(len(valid), 1), "seed": seed}}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.crystal.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run or checkpoint directory")
    p.add_argument("--dataset", required=True, help="dataset directory or CSV file(s)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--train-split", default=None, help="file name of the training split")
    p.add_argument("--eval-split", default=None, help="file name of the test split")
    p.add_argument("--out", default=None, help="output directory (default: CKPT/eval_<split>)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-atoms", type=int, default=None,
                   help="skip crystals with more atoms (default: the model's max_atoms)")
    p.add_argument("--max-crystals", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per matched pair")
    p.add_argument("--no-niggli", action="store_true")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except OSError as e:  # a read-only or full --out
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    model, ckpt = load_model(args.checkpoint, ema=args.ema)
    if getattr(model, "family", "") != "crystal":
        raise SystemExit(f"{args.checkpoint}: expected a crystal model, got "
                         f"{getattr(model, 'family', type(model).__name__)!r}")
    data = build_crystal_data(args.dataset, args.batch_size,
                              args.max_atoms or model.config.max_atoms, args.seed, args.workers,
                              not args.no_niggli, False, args.cache_dir, args.train_split,
                              args.eval_split, drop_last=False)
    out = Path(args.out) if args.out else Path(ckpt.path) / f"eval_{args.split}"
    metrics = evaluate_crystal(model, data, out, args.split, args.workers, args.timeout,
                               args.max_crystals, args.num_samples, args.seed)
    metrics["data"] = {k: data.info[k] for k in ("splits", "skipped", "sizes")}
    atomic_write_json(out / "metrics.json", metrics)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
