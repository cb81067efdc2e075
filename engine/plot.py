"""Plots of a run: `python -m engine.plot RUN_DIR` writes RUN_DIR/plots/*.png.

    curves.png        loss, reconstruction, KL and beta per epoch, train and val (metrics.jsonl)
    latent_scatter.png  posterior means of test images coloured by label: the latent itself
                      when it is 2-D, else its first two principal components (torch.pca_lowrank)
    kl_per_dim.png    mean KL(q(z_d|x) || N(0, 1)) per latent dim over the test images, active
                      units (Cov_x E_q[z_d] > 0.01) in colour

The latent plots need the checkpoint and its dataset (--data-dir or $VAE_DATA_DIR); a VQ-VAE or
crystal run gets the curves only. matplotlib runs on the Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.analysis.plots import latent_plots, plot_curves, read_metrics
from engine.checkpoint import CheckpointError, describe_os_error
from engine.data import DatasetError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory written by engine.train")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")
    p.add_argument("--data-dir", default=None, help="dataset root (else $VAE_DATA_DIR)")
    p.add_argument("--max-images", type=int, default=5000, help="test images in the scatter")
    p.add_argument("--curves-only", action="store_true", help="skip the latent plots")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = Path(args.run_dir)
    out = Path(args.out) if args.out else run / "plots"
    try:
        if not (run / "metrics.jsonl").exists():
            raise ValueError(f"{run} is not a run directory: no metrics.jsonl (expected the"
                             " --out folder of engine.train)")
        written = [plot_curves(read_metrics(run / "metrics.jsonl"), out / "curves.png")]
        if not args.curves_only:
            written += latent_plots(run, out, args.data_dir, args.max_images)
    except (CheckpointError, DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full --out: older plots there are kept
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
