"""Evaluate a checkpoint: `python -m engine.evaluate CKPT`.

    python -m engine.evaluate runs/mlp --iw-samples 1000 --out report.json
    python -m engine.evaluate runs/mlp-no3 --anomaly --holdout-class 3
    python -m engine.evaluate runs/vq                    # codebook usage, perplexity, dead codes
    python -m engine.evaluate runs/crystal --dataset data/mp_20   # -> engine.crystal.evaluate

Reports (JSON to --out, and a table on stdout), per image and averaged over the split:
  ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z)), one z ~ q per image, and its two parts;
  IWAE_k = log (1/k) sum_i p(x, z_i) / q(z_i | x), z_i ~ q(z|x) (Burda et al. 2016,
      https://arxiv.org/abs/1509.00519): a lower bound on log p(x) that tightens as k grows, so
      -IWAE_k is an upper-bound estimate of the NLL. All k samples and all images of a batch go
      through the decoder together; k is cut into chunks of at most --max-rows decoder rows
      (rows = chunk * batch), and the chunks are combined with a running logsumexp;
  active units (Burda et al.): A_u = Cov_x(E_q[z_u | x]) > 0.01, and KL per latent dim;
  reconstruction MSE and BCE of the deterministic reconstruction decode(E_q[z|x]), summed
      over pixels (BCE against the evaluated, possibly binarized, images);
  VQ-VAE: codebook usage, perplexity exp(H) of the code histogram over the whole split, and
      dead codes (never chosen);
  --anomaly --holdout-class C: score = -ELBO (or -IWAE_k with --iw-samples k > 1) per image,
      ROC-AUC of class C (positive) against the rest, see engine.anomaly; with
      --anomaly-score complexity the score is corrected by a zlib code length, and with
      --anomaly-score latent-knn it is the cosine distance from the image's posterior mean to
      its --knn-k-th nearest among the training images' (the classes the model was trained on).

The data comes from the checkpoint's training config (dataset, --binarize -> the fixed
"static" binarization of the test set, --pad-to-32); --data-dir or $VAE_DATA_DIR locate it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine import checkpoint as ckpt
from engine.anomaly import SCORES, anomaly_report, complexity_nats, knn_distance, likelihood_score
from engine.data import DatasetError, TensorLoader, load_images, split_train_val
from engine.losses import importance_terms, reconstruction

ACTIVE_THRESHOLD = 0.01
SPLITS = ("train", "val", "test")


# --- data -------------------------------------------------------------------------------------
def split_loader(train_cfg: dict[str, Any], split: str, data_dir: str | None = None,
                 batch_size: int = 500, max_images: int | None = None) -> TensorLoader:
    """The evaluation loader of `split`, prepared as the checkpoint was trained (binarized,
    padded); the test split keeps every class even when training excluded some."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    dataset = train_cfg.get("dataset", "mnist")
    images, labels = load_images(dataset, data_dir or train_cfg.get("data_dir"),
                                 train=split != "test")
    if split != "test":
        train_idx, val_idx = split_train_val(images.shape[0])
        idx = train_idx if split == "train" else val_idx
        images, labels = images[idx], labels[idx]
    if max_images is not None:
        images, labels = images[:max_images], labels[:max_images]
    return TensorLoader(images, labels, batch_size, shuffle=False, drop_last=False,
                        pad_to=32 if train_cfg.get("pad_to_32") else None,
                        binarize="static" if train_cfg.get("binarize") else "none")


def recon_kind(model, train_cfg: dict[str, Any]) -> str:
    return train_cfg.get("loss") or ("bce" if model.config.output == "sigmoid" else "mse")


def model_labels(model, y: Tensor) -> Tensor | None:
    return y if getattr(model, "conditional", False) else None


# --- Gaussian-latent models ---------------------------------------------------------------------
@torch.no_grad()
def iwae_log_likelihood(model, x: Tensor, y: Tensor | None, k: int, recon: str = "bce",
                        max_rows: int = 8192) -> Tensor:
    """IWAE_k lower bound on log p(x) per image (B,), k drawn in chunks of <= max_rows / B."""
    chunk = max(1, min(k, max_rows // max(1, x.shape[0])))
    total = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
    done = 0
    while done < k:
        n = min(chunk, k - done)
        log_px_z, log_pz, log_qz = importance_terms(model, x, y, n, recon)  # (n, B) each
        total = torch.logaddexp(total, torch.logsumexp((log_px_z + log_pz - log_qz).double(), 0))
        done += n
    return (total - math.log(k)).float()


@torch.no_grad()
def gaussian_pass(model, loader, recon: str, iw_samples: int = 0, max_rows: int = 8192,
                  seed: int = 0) -> dict[str, Tensor]:
    """One pass over the split: per-image tensors (N,) and posterior moments (N, L)."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    keys = ("elbo", "recon", "kl", "mse", "bce", "iwae", "label")
    out: dict[str, list[Tensor]] = {k: [] for k in (*keys, "mean", "kl_dim")}
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        yl = model_labels(model, y)
        post = model.encode(x, yl)
        z = post.sample()
        logits = model._decode_logits(z, yl)
        rec = reconstruction(logits, x, recon, model.output_activation)  # (B,)
        kl_dim = 0.5 * (post.mean.pow(2) + post.logvar.exp() - 1 - post.logvar)  # (B, L)
        kl = kl_dim.flatten(1).sum(1)
        x_hat_logits = model._decode_logits(post.mean, yl)
        out["recon"].append(rec), out["kl"].append(kl), out["elbo"].append(-(rec + kl))
        out["mse"].append(reconstruction(x_hat_logits, x, "mse", model.output_activation))
        out["bce"].append(_bce(x_hat_logits, x, model))
        out["mean"].append(post.mean.flatten(1)), out["kl_dim"].append(kl_dim.flatten(1))
        out["label"].append(y)
        if iw_samples > 1:
            out["iwae"].append(iwae_log_likelihood(model, x, yl, iw_samples, recon, max_rows))
    return {k: torch.cat(v).cpu() for k, v in out.items() if v}


def _bce(logits: Tensor, x: Tensor, model) -> Tensor:
    if model.config.output == "sigmoid":
        return reconstruction(logits, x, "bce", model.output_activation)
    return reconstruction(logits.clamp(-20, 20), x.clamp(0, 1), "bce", model.output_activation)


def active_units(means: Tensor, threshold: float = ACTIVE_THRESHOLD) -> tuple[int, Tensor]:
    """(count, per-dim variance) of E_q[z|x] over the data: means (N, L)."""
    var = means.double().var(dim=0, unbiased=False)
    return int((var > threshold).sum()), var.float()


def gaussian_report(stats: dict[str, Tensor], iw_samples: int) -> dict[str, Any]:
    n_active, var = active_units(stats["mean"])
    report: dict[str, Any] = {
        "n_images": int(stats["elbo"].numel()),
        "elbo": _mean(stats["elbo"]), "recon": _mean(stats["recon"]), "kl": _mean(stats["kl"]),
        "nll_elbo": -_mean(stats["elbo"]),
        "reconstruction": {"mse": _mean(stats["mse"]), "bce": _mean(stats["bce"])},
        "active_units": n_active, "active_threshold": ACTIVE_THRESHOLD,
        "latent_dim": int(var.numel()),
        "activity_per_dim": [round(v, 6) for v in var.tolist()],
        "kl_per_dim": [round(v, 6) for v in stats["kl_dim"].double().mean(0).tolist()],
    }
    if "iwae" in stats:
        report["iwae"] = {"k": iw_samples, "bound": _mean(stats["iwae"]),
                          "nll": -_mean(stats["iwae"])}
    return report


def _mean(t: Tensor) -> float:
    return float(t.double().mean())


# --- VQ-VAE -------------------------------------------------------------------------------------
@torch.no_grad()
def vq_report(model, loader, recon: str) -> dict[str, Any]:
    """Code histogram over the whole split, perplexity, dead codes, reconstruction errors."""
    device = next(model.parameters()).device
    num_codes = model.config.num_codes
    counts = torch.zeros(num_codes, dtype=torch.float64)
    sums = {"recon": 0.0, "mse": 0.0, "bce": 0.0}
    n = 0
    for x, _ in loader:
        x = x.to(device)
        codes = model.encode(x)  # (B, h, w)
        counts += torch.bincount(codes.reshape(-1).cpu(), minlength=num_codes).double()
        z_q = torch.nn.functional.embedding(codes, model.quantizer.codebook).permute(0, 3, 1, 2)
        logits = model.decoder(z_q)
        sums["recon"] += float(reconstruction(logits, x, recon, model.output_activation).sum())
        sums["mse"] += float(reconstruction(logits, x, "mse", model.output_activation).sum())
        sums["bce"] += float(_bce(logits, x, model).sum())
        n += x.shape[0]
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {"n_images": n, "recon": sums["recon"] / n,
            "reconstruction": {"mse": sums["mse"] / n, "bce": sums["bce"] / n},
            "vq": {"num_codes": num_codes, "codes_used": int((counts > 0).sum()),
                   "usage": float((counts > 0).double().mean()), "perplexity": math.exp(entropy),
                   "dead_codes": int((counts == 0).sum()),
                   "ema_dead_below_1": int((model.quantizer.ema_count < 1.0).sum())}}


# --- command line --------------------------------------------------------------------------------
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


def resolve_checkpoint(path: str) -> Path:
    """Prefer a run directory's best/ (what the trainer tests) over last/."""
    p = Path(path)
    if (p / "best" / "state.json").exists():
        return p / "best"
    return ckpt.resolve(p)


def evaluate_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    model, c = ckpt.load_model(resolve_checkpoint(args.checkpoint), ema=args.ema,
                               device=args.device)
    train_cfg = dict(c.config.get("train", {}))
    if args.dataset:
        train_cfg["dataset"] = args.dataset
    loader = split_loader(train_cfg, args.split, args.data_dir, args.batch_size, args.max_images)
    report: dict[str, Any] = {"checkpoint": str(c.path), "family": model.family,
                              "dataset": train_cfg.get("dataset"), "split": args.split,
                              "binarized": bool(train_cfg.get("binarize")),
                              "excluded_classes": train_cfg.get("exclude_class") or []}
    recon = recon_kind(model, train_cfg)
    report["recon_loss"] = recon
    if model.family == "vqvae":
        if args.anomaly or args.iw_samples > 1:
            raise ValueError("a VQ-VAE has no ELBO/IWAE here: --anomaly and --iw-samples need a"
                             " Gaussian-latent model")
        report.update(vq_report(model, loader, recon))
    else:
        stats = gaussian_pass(model, loader, recon, args.iw_samples, args.max_rows, args.seed)
        report.update(gaussian_report(stats, args.iw_samples))
        if args.anomaly:
            score, name = anomaly_score(args, model, train_cfg, stats, loader)
            report["anomaly"] = anomaly_report(score, stats["label"], args.holdout_class, name)
    report["seconds"] = time.perf_counter() - start
    return report


def anomaly_score(args: argparse.Namespace, model, train_cfg: dict[str, Any],
                  stats: dict[str, Tensor], loader: TensorLoader) -> tuple[Tensor, str]:
    """Per-image anomaly scores (N,) of the evaluated split and the score's name."""
    if args.anomaly_score == "latent-knn":
        bank = training_means(model, train_cfg, args)
        name = f"latent kNN (cosine, k={args.knn_k}, bank {bank.shape[0]})"
        return knn_distance(stats["mean"], bank, args.knn_k), name
    complexity = None
    if args.anomaly_score == "complexity":
        complexity = complexity_nats(loader.images, bool(train_cfg.get("binarize")))
    return likelihood_score(stats, args.iw_samples, complexity)


@torch.no_grad()
def training_means(model, train_cfg: dict[str, Any], args: argparse.Namespace) -> Tensor:
    """Posterior means (M, L) of the training split, restricted to the classes the model was
    trained on (train --exclude-class removes the held-out ones)."""
    loader = split_loader(train_cfg, "train", args.data_dir, args.batch_size, args.knn_bank)
    excluded = torch.tensor(train_cfg.get("exclude_class") or [], dtype=torch.long)
    device = next(model.parameters()).device
    means = []
    for x, y in loader:
        keep = ~torch.isin(y, excluded)
        if keep.any():
            x, y = x[keep].to(device), y[keep].to(device)
            means.append(model.encode(x, model_labels(model, y)).mean.flatten(1).cpu())
    if not means:
        raise ValueError("latent-knn: no training images left for the bank (all excluded);"
                         " raise --knn-bank or check the checkpoint's --exclude-class")
    return torch.cat(means)


def format_table(report: dict[str, Any]) -> str:
    rows = [("checkpoint", report["checkpoint"]), ("split", f"{report['split']}"
            f" ({report['n_images']} images, {report['dataset']})")]
    if "elbo" in report:
        rows += [("ELBO (nats)", f"{report['elbo']:.3f}"), ("  recon", f"{report['recon']:.3f}"),
                 ("  KL", f"{report['kl']:.3f}")]
    if "iwae" in report:
        rows.append((f"IWAE-{report['iwae']['k']} NLL", f"{report['iwae']['nll']:.3f}"))
    if "active_units" in report:
        rows.append(("active units", f"{report['active_units']} / {report['latent_dim']}"))
    rows += [("recon MSE", f"{report['reconstruction']['mse']:.4f}"),
             ("recon BCE", f"{report['reconstruction']['bce']:.4f}")]
    if "vq" in report:
        vq = report["vq"]
        rows += [("codes used", f"{vq['codes_used']} / {vq['num_codes']} ({vq['usage']:.1%})"),
                 ("perplexity", f"{vq['perplexity']:.2f}"), ("dead codes", str(vq["dead_codes"]))]
    if "anomaly" in report:
        an = report["anomaly"]
        rows.append((f"ROC-AUC class {an['holdout_class']}",
                     f"{an['roc_auc']:.4f}  (score: {an['score']})"))
    rows.append(("seconds", f"{report['seconds']:.1f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def delegate_crystal(args: argparse.Namespace, c: ckpt.Checkpoint) -> int:
    try:
        from engine.crystal.evaluate import main as crystal_main
    except ImportError as e:
        raise ValueError(f"{c.path} is a crystal model, and its evaluation lives in"
                         f" engine.crystal.evaluate, which cannot be imported here ({e})") from e
    dataset = args.dataset or c.config.get("train", {}).get("dataset")
    argv = [str(c.path), "--dataset", str(dataset),  # c: the resolved checkpoint (best/)
            "--split", args.crystal_split or args.split, "--seed", str(args.seed)]
    if args.out:
        argv += ["--out", str(Path(args.out).with_suffix(""))]
    return int(crystal_main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate(args)
        c = ckpt.read(resolve_checkpoint(args.checkpoint), verify=False)
        if c.config.get("model", {}).get("family") == "crystal" or args.crystal_split:
            return delegate_crystal(args, c)
        report = evaluate_checkpoint(args)
    except (ckpt.CheckpointError, DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_json(Path(args.out), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
