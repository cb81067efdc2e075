"""engine.evaluate: IWAE vs ELBO, chunked IWAE, active units, ROC-AUC, VQ stats, the CLI."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import engine.analysis.evaluation as evaluation
import engine.evaluate as ev
from engine import checkpoint as ckpt
from engine.analysis.anomaly import average_ranks, roc_auc, roc_auc_pairwise
from engine.data import TensorLoader
from engine.losses import iwae_bound, log_importance_weights
from engine.models.registry import build_model

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = os.environ.get("VAE_DATA_DIR", str(REPO.parent / "shared" / "datasets"))
needs_mnist = pytest.mark.skipif(not Path(DATA_DIR, "MNIST", "raw").is_dir(),
                                 reason=f"MNIST not found under {DATA_DIR}; set VAE_DATA_DIR")


def blobs(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary 28x28 images of 4 classes (a bar in one of 4 places, plus pixel noise)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(4, (n,), generator=gen)
    x = (torch.rand(n, 1, 28, 28, generator=gen) < 0.05).float()
    for c in range(4):
        x[y == c, :, 7 * c:7 * c + 7, 4:24] = 1.0
    return x, y


@pytest.fixture(scope="module")
def trained_mlp():
    """A small MLP VAE fitted for a few hundred steps on `blobs`: a fixed, non-trivial q."""
    torch.manual_seed(0)
    model = build_model("mlp", hidden_dims=(64,), latent_dim=4)
    x, _ = blobs(512)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150):
        batch = x[(step * 64) % 512:][:64]
        out = model(batch)
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(
            out.recon_logits, batch, reduction="none").flatten(1).sum(1) + out.kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# --- IWAE -------------------------------------------------------------------------------------
@torch.no_grad()
def test_iwae_bound_is_above_elbo_and_grows_with_k(trained_mlp):
    """On shared samples the inequalities are exact (Jensen on nested groups): IWAE_k averaged
    over disjoint groups of k weights never decreases as k doubles, and IWAE_1 is the ELBO."""
    torch.manual_seed(1)
    x, _ = blobs(64, seed=1)
    log_w = log_importance_weights(trained_mlp, x, None, 256).double()  # (256, B)
    bounds = []
    for k in (1, 2, 4, 16, 64, 256):
        groups = log_w.view(256 // k, k, -1)  # disjoint groups of k samples
        bounds.append(float((torch.logsumexp(groups, 1) - math.log(k)).mean()))
    elbo = float(log_w.mean())
    assert bounds[0] == pytest.approx(elbo, abs=1e-9)
    assert all(b2 >= b1 - 1e-9 for b1, b2 in zip(bounds, bounds[1:])), bounds
    assert bounds[-1] > elbo + 0.1  # a fitted q is not exact: the bound really tightens


@torch.no_grad()
def test_iwae_nll_estimate_below_negative_elbo_on_fresh_samples(trained_mlp):
    torch.manual_seed(2)
    x, y = blobs(200, seed=2)
    loader = TensorLoader((x * 255).to(torch.uint8), y, 100, shuffle=False, drop_last=False)
    nll = {k: -float(evaluation.gaussian_pass(trained_mlp, loader, "bce", k, seed=3)["iwae"].mean())
           for k in (2, 20, 200)}
    stats = evaluation.gaussian_pass(trained_mlp, loader, "bce", 0, seed=3)
    neg_elbo = -float(stats["elbo"].mean())
    assert nll[200] <= nll[20] <= nll[2] <= neg_elbo, (nll, neg_elbo)


def test_chunked_iwae_combines_chunks_exactly(monkeypatch):
    """Whatever the chunk size, the running logsumexp equals one logsumexp over all k."""
    log_w = torch.randn(37, 5, dtype=torch.float64) * 20
    drawn = []

    def fake_terms(model, x, y, n, recon):
        start = sum(drawn)
        drawn.append(n)
        w = log_w[start:start + n].float()
        return w, torch.zeros_like(w), torch.zeros_like(w)

    monkeypatch.setattr(evaluation, "importance_terms", fake_terms)
    x = torch.zeros(5, 1, 28, 28)
    got = evaluation.iwae_log_likelihood(None, x, None, k=37, max_rows=5 * 8)  # chunks of 8 samples
    assert drawn == [8, 8, 8, 8, 5]
    torch.testing.assert_close(got.double(), iwae_bound(log_w), rtol=1e-6, atol=1e-4)


# --- latent statistics -------------------------------------------------------------------------
def test_active_units_on_a_constructed_case():
    gen = torch.Generator().manual_seed(0)
    means = torch.zeros(5000, 5)
    means[:, 0] = torch.randn(5000, generator=gen)  # var 1: active
    means[:, 1] = 0.2 * torch.randn(5000, generator=gen)  # var 0.04: active
    means[:, 2] = 0.05 * torch.randn(5000, generator=gen)  # var 0.0025: inactive
    means[:, 3] = 3.0  # constant: inactive
    means[:, 4] = torch.linspace(-0.1, 0.1, 5000)  # var 0.0033: inactive
    count, var = evaluation.active_units(means)
    assert count == 2
    assert var[0] == pytest.approx(1.0, rel=0.1) and var[3] == 0


@torch.no_grad()
def test_active_units_of_a_model_with_dead_dims():
    """Dims whose posterior mean ignores x are inactive and have KL ~ 0 when q = p there."""
    model = build_model("mlp", hidden_dims=(32,), latent_dim=6).eval()
    w, b = model.to_params.weight, model.to_params.bias  # rows: 6 means, then 6 logvars
    w[2:6].zero_(), b[2:6].zero_(), w[8:12].zero_(), b[8:12].zero_()
    w[0:2].mul_(50.0)
    x, y = blobs(300)
    loader = TensorLoader((x * 255).to(torch.uint8), y, 100, shuffle=False, drop_last=False)
    report = evaluation.gaussian_report(evaluation.gaussian_pass(model, loader, "bce"), 1)
    assert report["active_units"] == 2
    assert report["kl_per_dim"][2:] == [0.0] * 4
    assert min(report["kl_per_dim"][:2]) > 0


# --- ROC-AUC --------------------------------------------------------------------------------
@pytest.mark.parametrize("n, levels", [(50, 1000), (300, 5), (7, 2)])
def test_roc_auc_matches_brute_force_with_ties(n, levels):
    scores = torch.randint(levels, (n,)).double()  # few levels: many ties
    positive = torch.rand(n) < 0.3
    positive[0], positive[1] = True, False
    assert roc_auc(scores, positive) == pytest.approx(roc_auc_pairwise(scores, positive),
                                                      abs=1e-12)


def test_roc_auc_extremes_and_ranks():
    assert roc_auc(torch.tensor([0.1, 0.2, 0.9, 0.8]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert roc_auc(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([0, 0, 1, 1])) == 0.0
    assert roc_auc(torch.ones(6), torch.tensor([0, 1, 0, 1, 0, 1])) == 0.5
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(torch.rand(4), torch.zeros(4))


# --- VQ-VAE ----------------------------------------------------------------------------------
@torch.no_grad()
def test_vq_report_counts_codes_over_the_whole_split():
    torch.manual_seed(0)
    model = build_model("vqvae", preset="vqvae-small").eval()
    x, y = blobs(64)
    loader = TensorLoader((x * 255).to(torch.uint8), y, 16, shuffle=False, drop_last=False)
    codes = model.encode(x)
    counts = torch.bincount(codes.flatten(), minlength=64).double()
    p = counts[counts > 0] / counts.sum()
    report = evaluation.vq_report(model, loader, "bce")
    assert report["vq"]["codes_used"] == int((counts > 0).sum())
    assert report["vq"]["dead_codes"] == 64 - report["vq"]["codes_used"]
    assert report["vq"]["perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())))


# --- the command line ---------------------------------------------------------------------------
def save(tmp_path: Path, model, **train) -> Path:
    cfg = {"dataset": "mnist", "binarize": True, "data_dir": DATA_DIR, "loss": "bce", **train}
    return ckpt.save(tmp_path / "run" / "best", model, train_config=cfg).parent


@needs_mnist
def test_cli_writes_report_with_iwae_and_anomaly(trained_mlp, tmp_path, capsys):
    run = save(tmp_path, trained_mlp)
    out = tmp_path / "report.json"
    code = ev.main([str(run), "--iw-samples", "8", "--max-images", "300", "--anomaly",
                    "--holdout-class", "1", "--out", str(out)])
    table = capsys.readouterr().out
    assert code == 0
    report = json.loads(out.read_text())
    assert report["n_images"] == 300 and report["split"] == "test"
    assert report["iwae"]["k"] == 8 and math.isfinite(report["iwae"]["nll"])
    assert report["elbo"] == pytest.approx(-(report["recon"] + report["kl"]), abs=1e-3)
    assert 0.0 <= report["anomaly"]["roc_auc"] <= 1.0
    assert report["anomaly"]["score"] == "-IWAE_8"
    assert len(report["kl_per_dim"]) == 4 and "IWAE-8 NLL" in table and "ROC-AUC" in table


@needs_mnist
def test_cli_vq_report(tmp_path, capsys):
    run = save(tmp_path, build_model("vqvae", preset="vqvae-small"))
    assert ev.main([str(run), "--max-images", "100", "--out", str(tmp_path / "r.json")]) == 0
    vq = json.loads((tmp_path / "r.json").read_text())["vq"]
    assert vq["codes_used"] + vq["dead_codes"] == 64 and vq["perplexity"] >= 1.0
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--iw-samples", "0"], "--iw-samples must be >= 1"),
    (["--anomaly"], "needs --holdout-class"),
    (["--holdout-class", "3"], "only applies with --anomaly"),
    (["--split", "dev"], "--split must be one of"),
])
def test_cli_rejects_bad_arguments(tmp_path, capsys, argv, message):
    run = save(tmp_path, build_model("mlp", hidden_dims=(16,), latent_dim=2))
    assert ev.main([str(run), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_cli_rejects_missing_checkpoint_and_vq_iwae(tmp_path, capsys):
    assert ev.main([str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    run = save(tmp_path, build_model("vqvae", preset="vqvae-small"))
    assert ev.main([str(run), "--iw-samples", "5", "--max-images", "10"]) == 2
    assert "Gaussian-latent" in capsys.readouterr().err


def test_crystal_checkpoints_are_delegated(tmp_path, monkeypatch, capsys):
    import engine.crystal.evaluate as crystal_eval

    seen = {}
    monkeypatch.setattr(crystal_eval, "main", lambda argv: seen.setdefault("argv", argv) and 0)
    run = save(tmp_path, build_model("mlp", hidden_dims=(16,), latent_dim=2),
               dataset="data/perov")
    assert ev.main([str(run), "--crystal-split", "val"]) == 0
    assert seen["argv"][1:5] == ["--dataset", "data/perov", "--split", "val"]


def test_anomaly_summary_table(tmp_path, capsys):
    from engine.anomaly import main as anomaly_main

    paths = []
    for c, auc in ((1, 0.25), (0, 0.75)):
        report = {"elbo": -100.0, "checkpoint": f"no{c}", "anomaly": {
            "holdout_class": c, "roc_auc": auc, "score": "-ELBO",
            "mean_score_per_class": {"0": 150.0, "1": 60.0, "2": 120.0}}}
        paths.append(tmp_path / f"r{c}.json")
        paths[-1].write_text(json.dumps(report))
    out = tmp_path / "s.json"
    assert anomaly_main([*map(str, paths), "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert [r["holdout_class"] for r in summary["per_class"]] == [0, 1]
    assert summary["mean_roc_auc"] == pytest.approx(0.5)
    assert summary["per_class"][1]["score_heldout"] == 60.0
    assert summary["per_class"][1]["score_others"] == pytest.approx(135.0)
    assert "| **mean** | **0.500** |" in capsys.readouterr().out


def test_complexity_is_larger_for_busier_images():
    from engine.analysis.anomaly import complexity_nats

    images = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)
    images[1, :, 10:12, :] = 255
    images[2] = (torch.rand(1, 28, 28) < 0.5).to(torch.uint8) * 255
    length = complexity_nats(images, binary=True)
    assert length[0] < length[1] < length[2]


@needs_mnist
def test_cli_complexity_corrected_anomaly_score(trained_mlp, tmp_path, capsys):
    run = save(tmp_path, trained_mlp)
    out = tmp_path / "r.json"
    assert ev.main([str(run), "--max-images", "200", "--anomaly", "--holdout-class", "1",
                    "--anomaly-score", "complexity", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["anomaly"]["score"] == "-ELBO - L_zlib"
    assert ev.main([str(run), "--anomaly", "--holdout-class", "1", "--anomaly-score", "x"]) == 2


# --- latent kNN anomaly score -------------------------------------------------------------------
@pytest.mark.parametrize("n, m, d, k, chunk", [(37, 50, 5, 1, 8), (64, 200, 3, 7, 1000),
                                                (9, 9, 2, 9, 4)])
def test_knn_distance_matches_brute_force(n, m, d, k, chunk):
    from engine.analysis.anomaly import knn_distance

    query, bank = torch.randn(n, d, dtype=torch.float64), torch.randn(m, d, dtype=torch.float64)
    got = knn_distance(query, bank, k, chunk)
    # reference: every cosine distance in a Python loop, sorted per row, the k-th smallest
    expected = []
    for q in query:
        cos = [float(q @ b / (q.norm() * b.norm())) for b in bank]
        expected.append(sorted(1 - c for c in cos)[k - 1])
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_knn_distance_ranks_an_unseen_direction_highest():
    from engine.analysis.anomaly import knn_distance

    bank = torch.randn(300, 4)
    bank[:, 0] = bank[:, 0].abs() + 1.0  # every bank code points into x0 > 0
    familiar = bank[:20] + 0.01 * torch.randn(20, 4)
    unseen = -bank[20:40]  # the opposite half-space
    score = knn_distance(torch.cat([familiar, unseen]), bank, k=3)
    assert score[20:].min() > score[:20].max()
    assert roc_auc(score, torch.arange(40) >= 20) == 1.0


def test_knn_distance_rejects_bad_shapes_and_k():
    from engine.analysis.anomaly import knn_distance

    with pytest.raises(ValueError, match=r"expected query \(N, D\) and bank \(M, D\)"):
        knn_distance(torch.randn(3, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"--knn-k must lie in \[1, 5\]"):
        knn_distance(torch.randn(3, 4), torch.randn(5, 4), k=6)


@needs_mnist
def test_training_bank_leaves_out_the_excluded_classes(trained_mlp, tmp_path):
    from engine.data import load_images, split_train_val

    run = save(tmp_path, trained_mlp, exclude_class=[1, 7])
    args = ev.build_parser().parse_args([str(run), "--knn-bank", "400"])
    config = ckpt.read(run / "best").config["train"]
    bank = evaluation.training_means(trained_mlp, config, args)
    _, labels = load_images("mnist", DATA_DIR, train=True)
    first = labels[split_train_val(labels.shape[0])[0][:400]]
    assert bank.shape == (int((~torch.isin(first, torch.tensor([1, 7]))).sum()), 4)


@needs_mnist
def test_cli_latent_knn_anomaly_score(trained_mlp, tmp_path):
    run = save(tmp_path, trained_mlp, exclude_class=[1])
    out = tmp_path / "r.json"
    assert ev.main([str(run), "--max-images", "300", "--anomaly", "--holdout-class", "1",
                    "--anomaly-score", "latent-knn", "--knn-k", "3", "--knn-bank", "500",
                    "--out", str(out)]) == 0
    an = json.loads(out.read_text())["anomaly"]
    assert an["score"].startswith("latent kNN (cosine, k=3, bank ")
    assert 0.0 <= an["roc_auc"] <= 1.0 and an["n_positive"] > 0
    assert all(v >= -1e-6 for v in an["mean_score_per_class"].values())  # distances in [0, 2]


@pytest.mark.parametrize("argv, message", [
    (["--anomaly", "--holdout-class", "1", "--anomaly-score", "knn"], "one of elbo, complexity"),
    (["--anomaly", "--holdout-class", "1", "--knn-k", "0"], "--knn-k and --knn-bank must be"),
])
def test_cli_rejects_bad_knn_arguments(tmp_path, capsys, argv, message):
    run = save(tmp_path, build_model("mlp", hidden_dims=(16,), latent_dim=2))
    assert ev.main([str(run), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
