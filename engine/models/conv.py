"""Convolutional VAE in the style of PyTorch-VAE's VanillaVAE, and its conditional form.

Encoder: one stride-2 conv + BatchNorm + LeakyReLU per entry of `hidden_dims`
    (B, C [+K], S, S) -> (B, h[-1], s, s) -> flatten -> Linear -> (mu, logvar) (B, latent_dim)
Decoder: Linear -> (B, h[-1], s, s) -> stride-2 transposed convs back up through the encoder's
    spatial sizes (so 28, 32 and 64 all round-trip exactly) -> 3x3 conv -> logits (B, C, S, S)
Conditioning (num_classes > 0): the one-hot label enters the encoder as K constant channels and
the decoder concatenated to z.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from engine.models.base import BaseVAE, Family
from engine.models.blocks import conv_spatial_sizes, down_block, one_hot, require_classes, up_block


@dataclass(frozen=True)
class ConvVAEConfig:
    """Configuration of `ConvVAE`.

    in_channels:  1 (MNIST, Fashion-MNIST) or 3.
    image_size:   28, 32 or 64 (any size >= 2**len(hidden_dims) works).
    hidden_dims:  channels of each stride-2 stage, encoder order.
    latent_dim:   size of z.
    num_classes:  > 0 makes the model conditional.
    output:       "sigmoid" (BCE) or "identity" (raw output, for MSE on unbounded data).
    """

    in_channels: int = 1
    image_size: int = 28
    hidden_dims: tuple[int, ...] = (32, 64, 128, 256)
    latent_dim: int = 128
    num_classes: int = 0
    output: str = "sigmoid"

    def __post_init__(self) -> None:
        if self.output not in ("sigmoid", "identity"):
            raise ValueError(f"output must be 'sigmoid' or 'identity', got {self.output!r}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.image_size < 2 ** len(self.hidden_dims):
            raise ValueError(
                f"image_size {self.image_size} is too small for {len(self.hidden_dims)}"
                " stride-2 stages; use fewer hidden_dims"
            )


class ConvVAE(BaseVAE):
    family = "conv"

    def __init__(self, config: ConvVAEConfig) -> None:
        super().__init__(config)
        c = config
        h = c.hidden_dims
        self.sizes = conv_spatial_sizes(c.image_size, len(h))  # e.g. 28 -> [28, 14, 7, 4, 2]
        s = self.sizes[-1]
        channels_in = (c.in_channels + c.num_classes, *h)
        self.encoder = nn.Sequential(*[down_block(a, b) for a, b in zip(channels_in, h)])
        self.to_params = nn.Linear(h[-1] * s * s, 2 * c.latent_dim)
        self.from_latent = nn.Linear(c.latent_dim + c.num_classes, h[-1] * s * s)
        rev, sizes = h[::-1], self.sizes[::-1]  # decoder walks the sizes back up
        ups = [up_block(rev[i], rev[min(i + 1, len(h) - 1)], sizes[i], sizes[i + 1])
               for i in range(len(h))]
        self.decoder = nn.Sequential(*ups)
        self.to_logits = nn.Conv2d(h[0], c.in_channels, 3, padding=1)

    def _encode_params(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        if y is not None:  # (B, K) one-hot broadcast to (B, K, S, S) extra channels
            planes = one_hot(y, self.config.num_classes, x.dtype)[:, :, None, None]
            x = torch.cat([x, planes.expand(-1, -1, *x.shape[2:])], dim=1)
        h = self.encoder(x).flatten(1)  # (B, h[-1] * s * s)
        mean, logvar = self.to_params(h).chunk(2, dim=1)
        return mean, logvar

    def _decode_logits(self, z: Tensor, y: Tensor | None) -> Tensor:
        if y is not None:
            z = torch.cat([z, one_hot(y, self.config.num_classes, z.dtype)], dim=1)
        s, c_last = self.sizes[-1], self.config.hidden_dims[-1]
        h = self.from_latent(z).view(-1, c_last, s, s)
        return self.to_logits(self.decoder(h))  # (B, C, S, S)


@dataclass(frozen=True)
class CVAEConvConfig(ConvVAEConfig):
    """`ConvVAEConfig` for the conditional family (num_classes >= 2)."""

    num_classes: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        require_classes(self.num_classes)


CONV_FAMILY = Family(
    "conv",
    ConvVAEConfig,
    ConvVAE,
    presets={
        "conv-mnist": {},
        "conv-fmnist-2d": {"latent_dim": 2},
        "conv-small": {"hidden_dims": (16, 32), "latent_dim": 16},
        "conv-celeba64": {"in_channels": 3, "image_size": 64, "latent_dim": 128},
    },
    # README: Fashion-MNIST test -ELBO 254.0 with EMA 0.999 (docs/results/fmnist_conv.json)
    recipes={"conv-mnist": {"ema": 0.999}},
)
CVAE_CONV_FAMILY = Family("cvae-conv", CVAEConvConfig, ConvVAE, presets={"cvae-conv-mnist": {}})
