"""Losses: pure functions returning (total, parts) so logging needs no special cases.

Reduction convention (every term, every objective): SUM over the elements of one example
(pixels for reconstruction, latent dimensions for KL), MEAN over the batch. With BCE on
binarized MNIST the loss is therefore -ELBO in nats per image, comparable to the literature.
MSE is the sum of squared errors per image (a Gaussian decoder with variance 1/2, up to a
constant).

Objectives:
  elbo   recon + beta * KL                              (beta-VAE, Higgins et al. 2017)
         recon + gamma * |KL - C(t)|                    (capacity annealing, Burgess et al. 2018)
  tcvae  recon + alpha MI + beta TC + gamma dwKL        (beta-TCVAE, Chen et al. 2018,
         https://arxiv.org/abs/1802.04942, minibatch-weighted sampling)
  iwae   -log (1/K) sum_k p(x, z_k) / q(z_k | x)        (Burda et al. 2016)
  vq     recon + ||sg(z_e) - e||^2 + beta_c ||z_e - sg(e)||^2
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

import kernels
from engine.distributions import DiagonalGaussian, standard_normal_log_prob

RECON_LOSSES = ("bce", "mse")
OBJECTIVES = ("elbo", "tcvae", "iwae")
SCHEDULES = ("constant", "linear", "cyclical", "capacity")


@dataclass(frozen=True)
class Objective:
    """What the trainer optimises. `beta` itself comes from the schedule each step."""

    recon: str = "bce"
    kind: str = "elbo"
    tc_alpha: float = 1.0  # beta-TCVAE weight of the mutual information
    tc_gamma: float = 1.0  # beta-TCVAE weight of the dimension-wise KL
    dataset_size: int = 60_000  # N in the minibatch-weighted sampling estimator
    iw_samples: int = 1
    capacity: bool = False  # |KL - C| instead of beta * KL

    def __post_init__(self) -> None:
        if self.recon not in RECON_LOSSES:
            raise ValueError(f"unknown loss {self.recon!r}; valid: {', '.join(RECON_LOSSES)}")
        if self.kind not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.kind!r}; valid: {', '.join(OBJECTIVES)}")
        if self.iw_samples < 1:
            raise ValueError(f"iw_samples must be >= 1, got {self.iw_samples}")


class KLWeight(NamedTuple):
    """Scheduled weights, as tensors so a compiled step does not recompile when they change."""

    beta: Tensor
    capacity: Tensor


# --- reconstruction and KL -------------------------------------------------------------------
def reconstruction(logits: Tensor, x: Tensor, kind: str, activation) -> Tensor:
    """Per-example reconstruction loss (B,): summed over all non-batch elements."""
    if kind == "bce":
        per = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    elif kind == "mse":
        per = (activation(logits) - x).pow(2)
    else:
        raise ValueError(f"unknown loss {kind!r}; valid: {', '.join(RECON_LOSSES)}")
    return per.flatten(1).sum(1)


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per example (B,), via the fused kernel dispatch."""
    return kernels.kl_divergence(mean.flatten(1), logvar.flatten(1))


# --- beta schedules ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BetaSchedule:
    """beta(t) for step t.

    constant  beta_end
    linear    beta_start -> beta_end over beta_steps, then beta_end (KL warm-up)
    cyclical  Fu et al. 2019: `cycles` cycles over beta_steps; each ramps linearly from
              beta_start to beta_end over the first `ratio` of the cycle, then holds
    capacity  Burgess et al. 2018: weight gamma = beta_end on |KL - C(t)|, C(t) rising linearly
              from 0 to capacity_max nats over beta_steps
    """

    kind: str = "constant"
    beta_start: float = 0.0
    beta_end: float = 1.0
    beta_steps: int = 10_000
    cycles: int = 4
    ratio: float = 0.5
    capacity_max: float = 25.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown beta schedule {self.kind!r}; valid: {', '.join(SCHEDULES)}")
        if self.beta_steps < 1 or self.cycles < 1 or not 0 < self.ratio <= 1:
            raise ValueError("beta_steps and cycles must be >= 1 and ratio in (0, 1]")

    def __call__(self, step: int) -> tuple[float, float]:
        """(beta, capacity) at `step`."""
        frac = min(step / self.beta_steps, 1.0)
        if self.kind == "constant":
            return self.beta_end, 0.0
        if self.kind == "linear":
            return self.beta_start + frac * (self.beta_end - self.beta_start), 0.0
        if self.kind == "cyclical":
            period = self.beta_steps / self.cycles
            phase = (step % period) / period if step < self.beta_steps else 1.0
            ramp = min(phase / self.ratio, 1.0)
            return self.beta_start + ramp * (self.beta_end - self.beta_start), 0.0
        return self.beta_end, frac * self.capacity_max


def kl_term(kl: Tensor, weight: KLWeight, capacity: bool) -> Tensor:
    """beta * KL, or gamma * |KL - C| for capacity annealing; kl is the batch mean."""
    return weight.beta * ((kl - weight.capacity).abs() if capacity else kl)


# --- objectives -------------------------------------------------------------------------------
def vae_objective(model, x: Tensor, y: Tensor | None, obj: Objective, weight: KLWeight):
    if obj.kind == "iwae":
        return iwae_objective(model, x, y, obj)
    out = model(x, y)
    recon = reconstruction(out.recon_logits, x, obj.recon, model.output_activation).mean()
    kl = out.kl.mean()
    parts = {"recon": recon.detach(), "kl": kl.detach(), "beta": weight.beta.detach()}
    if obj.kind == "tcvae":
        mi, tc, dwkl = tc_decomposition(out.posterior, out.z, obj.dataset_size)
        loss = recon + obj.tc_alpha * mi + weight.beta * tc + obj.tc_gamma * dwkl
        parts.update(mi=mi.detach(), tc=tc.detach(), dwkl=dwkl.detach())
    else:
        loss = recon + kl_term(kl, weight, obj.capacity)
        if obj.capacity:
            parts["capacity"] = weight.capacity.detach()
    parts["elbo"] = -(recon + kl).detach()
    return loss, parts


def tc_decomposition(posterior: DiagonalGaussian, z: Tensor, dataset_size: int):
    """(MI, TC, dimension-wise KL), batch means, by minibatch-weighted sampling.

    log q(z_i)        ~= logsumexp_j log q(z_i | x_j)            - log(B N)
    log prod_d q(z_id) ~= sum_d [logsumexp_j log q(z_id | x_j)    - log(B N)]
    MI   = E[log q(z|x) - log q(z)],   TC = E[log q(z) - log prod_d q(z_d)],
    dwKL = E[log prod_d q(z_d) - log p(z)]
    """
    mean, logvar = posterior.mean.flatten(1), posterior.logvar.flatten(1)  # (B, L)
    z = z.flatten(1)
    batch = z.shape[0]
    # log q(z_i,d | x_j) for every pair: (B, B, L)
    pair = -0.5 * (math.log(2 * math.pi) + logvar[None] + (z[:, None] - mean[None]).pow(2)
                   / logvar[None].exp())
    log_norm = math.log(batch * dataset_size)
    log_qz = torch.logsumexp(pair.sum(2), dim=1) - log_norm  # (B,)
    log_prod_qz = (torch.logsumexp(pair, dim=1) - log_norm).sum(1)  # (B,)
    log_qz_x = pair.diagonal(dim1=0, dim2=1).sum(0)  # (B,): log q(z_i | x_i)
    log_pz = standard_normal_log_prob(z, 1)
    mi = (log_qz_x - log_qz).mean()
    tc = (log_qz - log_prod_qz).mean()
    dwkl = (log_prod_qz - log_pz).mean()
    return mi, tc, dwkl


def importance_terms(model, x: Tensor, y: Tensor | None, k: int, recon: str = "bce"):
    """(log p(x|z_k), log p(z_k), log q(z_k|x)), each (k, B), for z_k ~ q(z|x).

    All k samples go through the decoder as one batch of k * B (no Python loop per image).
    """
    post = model.encode(x, y)
    batch, latent = x.shape[0], model.latent_shape
    mean = post.mean.unsqueeze(0).expand(k, *post.mean.shape).reshape(k * batch, -1)
    logvar = post.logvar.unsqueeze(0).expand(k, *post.logvar.shape).reshape(k * batch, -1)
    z = kernels.reparameterize(mean, logvar).view(k, batch, *latent)  # (k, B, *latent)
    y_rep = None if y is None else y.repeat(k)
    logits = model._decode_logits(z.reshape(k * batch, *latent), y_rep)
    x_rep = x.unsqueeze(0).expand(k, *x.shape).reshape(k * batch, *x.shape[1:])
    log_px_z = -reconstruction(logits, x_rep, recon, model.output_activation).view(k, batch)
    return log_px_z, standard_normal_log_prob(z, len(latent)), post.log_prob(z)


def log_importance_weights(model, x: Tensor, y: Tensor | None, k: int, recon: str = "bce"):
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x): shape (k, B)."""
    log_px_z, log_pz, log_qz = importance_terms(model, x, y, k, recon)
    return log_px_z + log_pz - log_qz


def iwae_bound(log_w: Tensor) -> Tensor:
    """log (1/K) sum_k w_k per example, from log weights (K, B)."""
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


def iwae_objective(model, x: Tensor, y: Tensor | None, obj: Objective):
    """-IWAE_K bound; parts report the single-sample terms averaged over the K samples."""
    log_px_z, log_pz, log_qz = importance_terms(model, x, y, obj.iw_samples, obj.recon)
    log_w = log_px_z + log_pz - log_qz
    bound = iwae_bound(log_w).mean()
    parts = {"recon": -log_px_z.mean().detach(), "kl": (log_qz - log_pz).mean().detach(),
             "elbo": log_w.mean().detach(), "iwae": bound.detach()}
    return -bound, parts


def vq_objective(model, x: Tensor, obj: Objective):
    """recon + VQ loss (codebook + commitment, from the fused kernel).

    The kernel's loss is a mean over all B*h*w*D elements; scaled by h*w*D it follows the same
    convention as the reconstruction (sum over one example, mean over the batch). Without it,
    the commitment term is h*w*D times weaker than the summed reconstruction and the encoder
    output drifts away from the codebook.
    """
    out = model(x)
    recon = reconstruction(out.recon_logits, x, obj.recon, model.output_activation).mean()
    vq_loss = out.extras["vq_loss"] * out.z[0].numel()
    loss = recon + vq_loss
    parts = {"recon": recon.detach(), "vq_loss": vq_loss.detach(),
             "perplexity": out.extras["perplexity"].detach(),
             "code_usage": out.extras["code_usage"].detach()}
    return loss, parts
