"""Losses against independent references: torch.distributions, explicit loops, identities."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.losses import (
    BetaSchedule,
    KLWeight,
    Objective,
    gaussian_kl,
    iwae_bound,
    log_importance_weights,
    reconstruction,
    tc_decomposition,
    vae_objective,
)
from engine.models import DiagonalGaussian, build_model


def test_bce_is_summed_over_pixels_per_image():
    logits, x = torch.randn(4, 1, 5, 5), torch.rand(4, 1, 5, 5)
    expected = torch.stack([F.binary_cross_entropy(torch.sigmoid(logits[i]), x[i],
                                                   reduction="sum") for i in range(4)])
    torch.testing.assert_close(reconstruction(logits, x, "bce", torch.sigmoid), expected,
                               rtol=1e-5, atol=1e-4)


def test_mse_is_summed_over_pixels_per_image():
    out, x = torch.rand(3, 2, 4, 4), torch.rand(3, 2, 4, 4)
    expected = ((out - x) ** 2).sum(dim=(1, 2, 3))
    torch.testing.assert_close(reconstruction(out, x, "mse", lambda t: t), expected)


def test_gaussian_kl_matches_torch_distributions():
    mu, logvar = torch.randn(5, 9, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), ref)


def test_elbo_objective_reduction_is_mean_over_batch():
    model = build_model("mlp", hidden_dims=(16,), latent_dim=3)
    x = torch.bernoulli(torch.rand(6, 1, 28, 28))
    torch.manual_seed(0)
    loss, parts = vae_objective(model, x, None, Objective(), KLWeight(torch.tensor(0.5),
                                                                       torch.tensor(0.0)))
    torch.testing.assert_close(loss, parts["recon"] + 0.5 * parts["kl"])
    assert parts["elbo"] == pytest.approx(-(parts["recon"] + parts["kl"]).item())
    assert 6 * 28 * 28 * 0.3 < parts["recon"] * 6 < 6 * 28 * 28 * 2  # per-image sum, not mean


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (BetaSchedule("constant", beta_end=4.0), {0: 4.0, 500: 4.0}),
        (BetaSchedule("linear", 0.0, 1.0, 100), {0: 0.0, 50: 0.5, 100: 1.0, 1000: 1.0}),
        (BetaSchedule("cyclical", 0.0, 1.0, 400, cycles=4, ratio=0.5),
         {0: 0.0, 25: 0.5, 50: 1.0, 99: 1.0, 100: 0.0, 125: 0.5, 400: 1.0}),
    ],
)
def test_beta_schedules(schedule, expected):
    for step, beta in expected.items():
        assert schedule(step)[0] == pytest.approx(beta), step


def test_capacity_schedule_ramps_capacity_and_uses_abs():
    s = BetaSchedule("capacity", beta_end=100.0, beta_steps=10, capacity_max=5.0)
    assert s(0) == (100.0, 0.0) and s(5) == (100.0, 2.5) and s(50) == (100.0, 5.0)
    model = build_model("mlp", hidden_dims=(16,), latent_dim=3)
    x = torch.rand(4, 1, 28, 28)
    torch.manual_seed(1)
    loss, p = vae_objective(model, x, None, Objective(capacity=True),
                            KLWeight(torch.tensor(100.0), torch.tensor(25.0)))
    torch.testing.assert_close(loss, p["recon"] + 100.0 * (p["kl"] - 25.0).abs())


def test_unknown_schedule_or_loss_names_are_listed():
    with pytest.raises(ValueError, match="valid: constant, linear, cyclical, capacity"):
        BetaSchedule("warm")
    with pytest.raises(ValueError, match="valid: bce, mse"):
        Objective(recon="l1")


def tc_reference(mu, logvar, z, n_data):
    """Explicit double loop over the minibatch (Chen et al. 2018, eq. for MWS)."""
    b, d = z.shape
    normal = lambda v, m, lv: -0.5 * (math.log(2 * math.pi) + lv + (v - m) ** 2 / lv.exp())
    mi = tc = dw = 0.0
    for i in range(b):
        per_j = torch.stack([normal(z[i], mu[j], logvar[j]) for j in range(b)])  # (B, D)
        log_qz = torch.logsumexp(per_j.sum(1), 0) - math.log(b * n_data)
        log_prod = (torch.logsumexp(per_j, 0) - math.log(b * n_data)).sum()
        log_qzx = normal(z[i], mu[i], logvar[i]).sum()
        log_pz = normal(z[i], torch.zeros(d, dtype=z.dtype), torch.zeros(d, dtype=z.dtype)).sum()
        mi, tc, dw = mi + log_qzx - log_qz, tc + log_qz - log_prod, dw + log_prod - log_pz
    return mi / b, tc / b, dw / b


def test_tc_decomposition_matches_explicit_loop():
    mu, logvar = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
    got = tc_decomposition(DiagonalGaussian(mu, logvar), z, dataset_size=1000)
    for a, b in zip(got, tc_reference(mu, logvar, z, 1000)):
        torch.testing.assert_close(a, b)
    # the three terms add up to the sampled KL estimate E[log q(z|x) - log p(z)]
    total = sum(got)
    log_q = DiagonalGaussian(mu, logvar).log_prob(z)
    log_p = (-0.5 * (math.log(2 * math.pi) + z**2)).sum(1)
    torch.testing.assert_close(total, (log_q - log_p).mean())


def test_tcvae_objective_trains_end_to_end():
    model = build_model("mlp", hidden_dims=(16,), latent_dim=4)
    loss, parts = vae_objective(model, torch.rand(8, 1, 28, 28), None,
                                Objective(kind="tcvae", dataset_size=100),
                                KLWeight(torch.tensor(6.0), torch.tensor(0.0)))
    loss.backward()
    assert {"mi", "tc", "dwkl"} <= set(parts) and torch.isfinite(loss)


@torch.no_grad()
def test_iwae_bound_is_above_elbo_and_grows_with_k():
    """Split K samples into blocks of k: by Jensen, log of the mean over all K weights is >= the
    mean over blocks of the log of each block's mean, so the block-averaged bound can only
    grow with k, starting from the ELBO at k = 1. This holds for every draw, not on average."""
    model = build_model("mlp", hidden_dims=(32,), latent_dim=4).eval()
    x = torch.bernoulli(torch.rand(16, 1, 28, 28))
    log_w = log_importance_weights(model, x, None, 4096).double()  # (K, B)
    bounds = [iwae_bound(log_w.view(4096 // k, k, -1).transpose(0, 1)).mean(0)
              for k in (1, 16, 256, 4096)]  # per image, averaged over blocks
    torch.testing.assert_close(bounds[0], log_w.mean(0))  # k = 1 is the ELBO estimate
    for smaller, larger in zip(bounds, bounds[1:]):
        assert (larger >= smaller - 1e-9).all()
    assert (bounds[-1] > bounds[0]).all()  # strictly tighter than the ELBO for a real posterior
