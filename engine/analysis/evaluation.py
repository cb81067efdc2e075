"""The library side of `python -m engine.evaluate`: ELBO parts, IWAE-k, active units, KL per
dimension, VQ codebook statistics and anomaly scores of a checkpoint on one data split.

Reports, per image and averaged over the split:
  ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z)), one z ~ q per image, and its two parts;
  IWAE_k = log (1/k) sum_i p(x, z_i) / q(z_i | x), z_i ~ q(z|x) (Burda et al. 2016,
      https://arxiv.org/abs/1509.00519): a lower bound on log p(x) that tightens as k grows, so
      -IWAE_k is an upper-bound estimate of the NLL. All k samples and all images of a batch go
      through the decoder together; k is cut into chunks of at most `max_rows` decoder rows
      (rows = chunk * batch), and the chunks are combined with a running logsumexp;
  active units (Burda et al.): A_u = Cov_x(E_q[z_u | x]) > 0.01, and KL per latent dim;
  reconstruction MSE and BCE of the deterministic reconstruction decode(E_q[z|x]), summed
      over pixels (BCE against the evaluated, possibly binarized, images);
  VQ-VAE: codebook usage, perplexity exp(H) of the code histogram over the whole split, and
      dead codes (never chosen);
  anomaly scores: -ELBO (or -IWAE_k), its zlib-complexity correction, or the latent kNN
      distance (engine.analysis.anomaly).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine import checkpoint as ckpt
from engine.analysis.anomaly import anomaly_report, complexity_nats, knn_distance, likelihood_score
from engine.data import TensorLoader, load_images, split_train_val
from engine.losses import importance_terms, reconstruction

ACTIVE_THRESHOLD = 0.01


SPLITS = ("train", "val", "test")


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
    if model.family == "vqvae" and (args.anomaly or args.iw_samples > 1):  # before any data
        raise ValueError("a VQ-VAE has no ELBO/IWAE here: --anomaly and --iw-samples need a"
                         " Gaussian-latent model")
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
