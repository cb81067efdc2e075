"""VQ-VAE: codes, straight-through gradients, EMA updates, k-means init, dead-code restart."""

from __future__ import annotations

import torch

from engine.losses import KLWeight, Objective
from engine.models import build_model
from engine.models.vq import kmeans

W = KLWeight(torch.tensor(1.0), torch.tensor(0.0))


def small_vq(**kw):
    return build_model("vqvae", preset="vqvae-small", **kw)


def test_encode_decode_codes_shapes_and_nearest_code():
    model = small_vq().eval()
    x = torch.rand(3, 1, 28, 28)
    codes = model.encode(x)
    assert codes.shape == (3, 7, 7) and codes.dtype == torch.int64
    z_e = model.encoder(x).permute(0, 2, 3, 1).reshape(-1, model.config.code_dim).double()
    dist = torch.cdist(z_e, model.quantizer.codebook.double())  # independent reference
    chosen = dist.gather(1, codes.reshape(-1, 1)).squeeze(1)
    torch.testing.assert_close(chosen, dist.min(1).values, rtol=1e-5, atol=1e-6)
    assert model.decode(codes).shape == x.shape


def test_gradient_reaches_encoder_and_codebook():
    model = small_vq()
    loss, parts = model.training_loss((torch.rand(4, 1, 28, 28), None), Objective(), W)
    loss.backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0  # straight-through
    assert model.quantizer.codebook.grad.abs().sum() > 0  # codebook loss
    assert {"recon", "vq_loss", "perplexity", "code_usage"} <= set(parts)
    assert 1 <= parts["perplexity"] <= model.config.num_codes


def test_ema_codebook_moves_toward_assigned_vectors():
    model = small_vq(ema_decay=0.5)
    assert not model.quantizer.codebook.requires_grad
    before = model.quantizer.codebook.detach().clone()
    model.training_loss((torch.rand(8, 1, 28, 28), None), Objective(), W)
    assert not torch.equal(before, model.quantizer.codebook)


def test_kmeans_recovers_separated_clusters():
    centers = torch.randn(4, 3) * 10
    x = (centers[:, None] + 0.01 * torch.randn(4, 50, 3)).reshape(-1, 3)
    # every true center gets a centroid within the noise radius; Lloyd's algorithm can stall
    # in a local optimum from an unlucky random init, so take the best of a few seeds
    worst_miss = [
        torch.cdist(centers, kmeans(x, 4, 20, torch.Generator().manual_seed(s))).min(1)
        .values.max().item() for s in range(5)
    ]
    assert min(worst_miss) < 0.1


def test_kmeans_init_runs_once_and_survives_state_dict():
    model = small_vq(kmeans_init=True, ema_decay=0.9)
    model.train()
    model(torch.rand(4, 1, 28, 28))
    assert bool(model.quantizer.initialized) and not model.quantizer._needs_init
    fresh = small_vq(kmeans_init=True, ema_decay=0.9)
    fresh.load_state_dict(model.state_dict())
    assert not fresh.quantizer._needs_init


def test_dead_codes_restart_at_encoder_outputs():
    model = small_vq(ema_decay=0.9, dead_code_threshold=1.0)
    q = model.quantizer
    with torch.no_grad():
        q.codebook.data.fill_(1e3)  # every code far away ...
        q.codebook.data[0].zero_()  # ... but code 0, which takes every assignment
        q.ema_count.fill_(0.0)
    model.train()
    model(torch.rand(4, 1, 28, 28))
    restarted = (q.codebook.detach() != 1e3).any(1)
    assert restarted.sum() > q.c.num_codes // 2  # dead codes moved to real encoder outputs
