"""Anomaly scoring with a VAE's likelihood, and ROC-AUC without scikit-learn.

Score: s(x) = -ELBO(x) (or -IWAE_k(x)), in nats: higher means less likely under the model,
i.e. more anomalous. With a model trained without class C (`engine.train --exclude-class C`),
the ROC-AUC of class C (positive) against the other classes measures how well the likelihood
separates the unseen class.

ROC-AUC by the rank-sum (Mann-Whitney U) formula, ties counted as 1/2:
    AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)
where R_pos is the sum of the positives' ranks among all scores (1-based; tied scores share
the average of their ranks). It equals P(s_pos > s_neg) + 1/2 P(s_pos = s_neg) over all pairs.

Known failure: likelihood scores measure how *simple* an image is as much as how *familiar*
it is (Nalisnick et al. 2019, https://arxiv.org/abs/1810.09136). A held-out class with few
"on" pixels (MNIST 1) gets a high likelihood even unseen, and scores as less anomalous than
the training classes: its AUC falls below 0.5.

Correction (--anomaly-score complexity; Serra et al. 2020, https://arxiv.org/abs/1909.11480):
    s(x) = -ELBO(x) - L(x),   L(x) = 8 ln 2 * len(zlib.compress(x's bytes, 9))  nats
a likelihood ratio against a generic compressor: simple images are cheap for both models, so
their simplicity cancels and what is left is how much better the VAE knows them.

Latent kNN (--anomaly-score latent-knn; the deep-nearest-neighbour score of Sun et al. 2022,
https://arxiv.org/abs/2204.06507, on the VAE's posterior means):
    s(x) = 1 - cos(mu(x), mu(x_(k)))
where x_(k) is the k-th nearest training image (of the classes the model was trained on) by
cosine similarity of posterior means. It asks "is there familiar data near this code?" instead
of "how probable are these pixels?", so image simplicity does not enter; on the MNIST
leave-one-digit-out sweep it lifts the mean ROC-AUC well above the likelihood scores (README).
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
import torch
from torch import Tensor


def average_ranks(scores: Tensor) -> Tensor:
    """1-based ranks of scores (N,), ties sharing the mean of their ranks (float64)."""
    s = scores.double().reshape(-1)
    sorted_s, order = s.sort()
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True,
                                                  return_counts=True)
    ends = counts.cumsum(0).double()  # last 1-based rank of each run of ties
    mean_rank = ends - (counts.double() - 1) / 2  # mean of (end - count + 1) .. end
    ranks = torch.empty_like(s)
    ranks[order] = mean_rank[inverse]
    return ranks


def roc_auc(scores: Tensor, positive: Tensor) -> float:
    """ROC-AUC of scores (N,) for the boolean labels `positive` (N,), by the rank sum."""
    positive = positive.reshape(-1).bool()
    if scores.numel() != positive.numel():
        raise ValueError(f"roc_auc: {scores.numel()} scores but {positive.numel()} labels")
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc needs both classes; got {n_pos} positives, {n_neg} negatives")
    rank_sum = float(average_ranks(scores)[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def roc_auc_pairwise(scores: Tensor, positive: Tensor) -> float:
    """Reference: count every (positive, negative) pair, ties as 1/2. O(n_pos n_neg) memory."""
    positive = positive.reshape(-1).bool()
    pos, neg = scores[positive].double(), scores[~positive].double()
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def complexity_nats(images: Tensor, binary: bool) -> Tensor:
    """Generic-compressor code length per image (N,) in nats: zlib level 9 on the raw bytes
    (uint8 (N, ...)), bit-packed first when the images are binary."""
    flat = images.reshape(images.shape[0], -1).cpu().numpy()
    if binary:
        flat = np.packbits(flat > 127, axis=1)
    lengths = [len(zlib.compress(row.tobytes(), 9)) for row in flat]
    return torch.tensor(lengths, dtype=torch.float64) * 8 * math.log(2)


SCORES = ("elbo", "complexity", "latent-knn")


def likelihood_score(stats: dict[str, Tensor], iw_samples: int = 1,
                     complexity: Tensor | None = None) -> tuple[Tensor, str]:
    """(score (N,) float64, its name): -ELBO, or -IWAE_k when k > 1 was evaluated, minus the
    complexity (nats per image) when given."""
    use_iwae = iw_samples > 1 and "iwae" in stats
    score = -(stats["iwae"] if use_iwae else stats["elbo"]).double()
    name = f"-IWAE_{iw_samples}" if use_iwae else "-ELBO"
    if complexity is None:
        return score, name
    return score - complexity, name + " - L_zlib"


def knn_distance(query: Tensor, bank: Tensor, k: int = 10, chunk: int = 256) -> Tensor:
    """Cosine distance (N,) float64 from each query row (N, D) to its k-th nearest bank row
    (M, D). Rows are L2-normalized, so d = 1 - q.b (= |q - b|^2 / 2) and the k-th nearest is
    the k-th largest similarity; query chunks keep the (chunk, M) similarity block small."""
    if query.dim() != 2 or bank.dim() != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(f"knn_distance: expected query (N, D) and bank (M, D), got"
                         f" {tuple(query.shape)} and {tuple(bank.shape)}")
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"--knn-k must lie in [1, {bank.shape[0]}] (the bank size), got {k}")
    bank_t = torch.nn.functional.normalize(bank.float(), dim=1).T  # (D, M)
    out = [1 - (torch.nn.functional.normalize(q.float(), dim=1) @ bank_t).topk(k).values[:, -1]
           for q in query.split(chunk)]
    return torch.cat(out).double()


def anomaly_report(score: Tensor, labels: Tensor, holdout_class: int, name: str
                   ) -> dict[str, Any]:
    """ROC-AUC of `holdout_class` (positive) against the rest for per-image scores (N,),
    higher = more anomalous, and the mean score of every class."""
    positive = labels == holdout_class
    if not positive.any():
        raise ValueError(f"--holdout-class {holdout_class} does not occur in the evaluated split;"
                         f" labels present: {sorted(set(labels.tolist()))}")
    per_class = {int(c): float(score[labels == c].double().mean()) for c in labels.unique()}
    return {"holdout_class": holdout_class, "score": name,
            "roc_auc": roc_auc(score, positive), "n_positive": int(positive.sum()),
            "n_negative": int((~positive).sum()), "mean_score_per_class": per_class}


# --- summary of a leave-one-class-out sweep ------------------------------------------------------
def summarize(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Per held-out class ROC-AUC (from engine.evaluate --anomaly reports) and their mean."""
    rows = sorted((_row(r) for r in reports), key=lambda row: row["holdout_class"])
    aucs = [row["roc_auc"] for row in rows]
    return {"per_class": rows, "mean_roc_auc": sum(aucs) / len(aucs),
            "min": min(aucs), "max": max(aucs)}


def _row(report: dict[str, Any]) -> dict[str, Any]:
    an = report["anomaly"]
    c, per_class = an["holdout_class"], an["mean_score_per_class"]
    others = [v for k, v in per_class.items() if int(k) != c]
    return {"holdout_class": c, "roc_auc": an["roc_auc"], "score": an["score"],
            "score_heldout": per_class[str(c)] if str(c) in per_class else per_class[c],
            "score_others": sum(others) / len(others), "test_elbo": report["elbo"],
            "checkpoint": report["checkpoint"]}


def markdown_table(summary: dict[str, Any]) -> str:
    lines = ["| held-out digit | ROC-AUC | mean score, held-out digit | mean score, other digits"
             " (unweighted) | test ELBO, all digits |", "|---|---|---|---|---|"]
    lines += [f"| {r['holdout_class']} | {r['roc_auc']:.3f} | {r['score_heldout']:.4g} |"
              f" {r['score_others']:.4g} | {r['test_elbo']:.2f} |" for r in summary["per_class"]]
    lines.append(f"| **mean** | **{summary['mean_roc_auc']:.3f}** | | | |")
    return "\n".join(lines) + "\n"
