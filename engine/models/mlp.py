"""MLP VAE (Kingma & Welling 2014, https://arxiv.org/abs/1312.6114) and its conditional form
(Sohn et al. 2015, https://papers.nips.cc/paper/5775): the classic 784-400-20 PyTorch example.

    x (B, C, H, W) -> flatten -> [one-hot y] -> hidden_dims -> (mu, logvar) (B, latent_dim)
    z (B, latent_dim) -> [one-hot y] -> reversed hidden_dims -> logits (B, C, H, W)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from engine.models.base import BaseVAE, Family
from engine.models.blocks import mlp, one_hot, require_classes


@dataclass(frozen=True)
class MLPVAEConfig:
    """Configuration of `MLPVAE`.

    in_channels:  image channels (1 for MNIST).
    image_size:   height = width of the input image (28, or 32 when padded).
    hidden_dims:  encoder hidden layer widths; the decoder mirrors them.
    latent_dim:   size of z.
    num_classes:  > 0 makes the model conditional: the one-hot label is concatenated to the
                  encoder input and to z.
    output:       "sigmoid" (Bernoulli / BCE, images in [0, 1]) or "identity" (Gaussian / MSE).
    """

    in_channels: int = 1
    image_size: int = 28
    hidden_dims: tuple[int, ...] = (400,)
    latent_dim: int = 20
    num_classes: int = 0
    output: str = "sigmoid"

    def __post_init__(self) -> None:
        if self.output not in ("sigmoid", "identity"):
            raise ValueError(f"output must be 'sigmoid' or 'identity', got {self.output!r}")
        if self.latent_dim < 1 or not self.hidden_dims:
            raise ValueError("latent_dim must be >= 1 and hidden_dims non-empty")


class MLPVAE(BaseVAE):
    family = "mlp"

    def __init__(self, config: MLPVAEConfig) -> None:
        super().__init__(config)
        c = config
        d_x = c.in_channels * c.image_size**2
        self.encoder = mlp((d_x + c.num_classes, *c.hidden_dims))
        self.to_params = nn.Linear(c.hidden_dims[-1], 2 * c.latent_dim)
        self.decoder = mlp((c.latent_dim + c.num_classes, *reversed(c.hidden_dims)))
        self.to_logits = nn.Linear(c.hidden_dims[0], d_x)

    def _with_label(self, h: Tensor, y: Tensor | None) -> Tensor:
        if y is None:
            return h
        return torch.cat([h, one_hot(y, self.config.num_classes, h.dtype)], dim=1)

    def _encode_params(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        h = self.encoder(self._with_label(x.flatten(1), y))  # (B, hidden[-1])
        mean, logvar = self.to_params(h).chunk(2, dim=1)  # (B, latent) each
        return mean, logvar

    def _decode_logits(self, z: Tensor, y: Tensor | None) -> Tensor:
        h = self.decoder(self._with_label(z, y))
        return self.to_logits(h).view(z.shape[0], *self.data_shape)


MLP_FAMILY = Family(
    "mlp",
    MLPVAEConfig,
    MLPVAE,
    presets={
        "mlp-mnist": {},
        "mlp-mnist-large": {"hidden_dims": (512, 512), "latent_dim": 32},
        "mlp-mnist-2d": {"hidden_dims": (512, 256), "latent_dim": 2},
    },
    # README: test -ELBO 103.6 after 10 epochs (docs/results/mnist_mlp.json)
    recipes={"mlp-mnist": {"batch_size": 64, "ema": 0.999}},
)


@dataclass(frozen=True)
class CVAEMLPConfig(MLPVAEConfig):
    """`MLPVAEConfig` for the conditional family: the label is required (num_classes > 0)."""

    num_classes: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        require_classes(self.num_classes)


CVAE_MLP_FAMILY = Family("cvae-mlp", CVAEMLPConfig, MLPVAE, presets={"cvae-mlp-mnist": {}})
