"""The diagonal Gaussian posterior and the log-densities that models and losses share.

    q(z|x) = N(mean, diag(exp(logvar)))       mean, logvar: (B, *latent_shape)
    log N(z; mu, s^2) = -1/2 (log 2 pi + log s^2 + (z - mu)^2 / s^2), summed over latent dims

It sits below both `engine.models` and `engine.losses`, so neither imports the other for it.
Sampling and KL go through `kernels` (fused Triton where dispatch allows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

import kernels

LOG_2PI = math.log(2 * math.pi)


@dataclass
class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))); `mean` and `logvar` have shape (B, *latent_shape)."""

    mean: Tensor
    logvar: Tensor

    def sample(self, seed: int | None = None) -> Tensor:
        """z = mean + exp(0.5 logvar) * eps, through the fused kernel where dispatch allows."""
        return kernels.reparameterize(self.mean, self.logvar, seed=seed)

    def sample_with_kl(self, seed: int | None = None) -> tuple[Tensor, Tensor]:
        """(z, KL(q || N(0, I)) per row) in one pass over mean and logvar."""
        z, kl = kernels.reparameterize_kl(self.mean.flatten(1), self.logvar.flatten(1), seed=seed)
        return z.view_as(self.mean), kl

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) summed over latent dims: shape (B,)."""
        return kernels.kl_divergence(self.mean.flatten(1), self.logvar.flatten(1))

    def mode(self) -> Tensor:
        return self.mean

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z|x) summed over latent dims; z: (..., B, *latent), leading dims broadcast."""
        var = self.logvar.exp()
        elem = -0.5 * (LOG_2PI + self.logvar + (z - self.mean).pow(2) / var)
        return elem.flatten(-len(self.mean.shape[1:])).sum(-1)


def standard_normal_log_prob(z: Tensor, latent_ndim: int) -> Tensor:
    """log N(z; 0, I) summed over the trailing `latent_ndim` dims."""
    return (-0.5 * (LOG_2PI + z.pow(2))).flatten(-latent_ndim).sum(-1)
