"""AutoencoderTiny: TAESD, TAESDXL and TAEF1, the tiny distilled latent-diffusion VAEs
(madebyollin, https://github.com/madebyollin/taesd), with diffusers' `AutoencoderTiny` module
tree and parameter names.

    Block     x -> relu(conv(relu(conv(relu(conv(x))))) + skip(x)), 3x3 convs, skip is a 1x1
              conv without bias when channels change, else identity
    encoder   images in [-1, 1] -> (x + 1) / 2 -> layers: conv, Blocks, then per further stage a
              3x3 stride-2 conv (no bias) and Blocks, then a 3x3 conv to C channels
              (B, 3, H, W) -> latents (B, C, H/8, W/8)
    decoder   z -> 3 tanh(z / 3) (the original's `Clamp`, no parameters) -> layers: conv, ReLU,
              per stage Blocks then (nearest 2x, conv without bias) or, last, a conv with bias
              -> 2 x - 1, images in [-1, 1]

TAESD's encoder outputs the latents themselves, with no variance. Here `encode` returns them as
a point mass, DiagonalGaussian(latents, logvar = -inf): `sample()` and `mode()` both give the
latents exactly (the noise is multiplied by exp(-inf / 2) = 0) and `kl()` is +inf, which is the
KL of a point mass from N(0, I); `log_prob` is undefined (NaN). The encoder export outputs
`latents` only.

TAESD works in the same latent space as the VAE it distills, as diffusers' pipelines use it:
the released configs set scaling_factor 1.0 and shift_factor 0.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from engine.distributions import DiagonalGaussian
from engine.models.base import Family
from engine.models.latent_diffusion.base import LatentDiffusionVAE

TANH_RANGE = 3.0  # the decoder's soft clamp: 3 tanh(z / 3)


@dataclass(frozen=True)
class AutoencoderTinyConfig:
    """Configuration of `AutoencoderTiny` (field names as in diffusers' config.json).

    encoder_block_out_channels / num_encoder_blocks:  channels and Blocks per encoder stage;
        every stage after the first starts with a stride-2 conv.
    decoder_block_out_channels / num_decoder_blocks:  the same for the decoder; every stage but
        the last ends with a nearest 2x upsample.
    latent_channels:  4 (TAESD, TAESDXL) or 16 (TAEF1, TAESD3).
    scaling_factor, shift_factor, force_upcast:  as in AutoencoderKL (1.0, 0.0, false).
    latent_magnitude, latent_shift:  kept for diffusers' byte-quantization helpers.
    """

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_channels: int = 4
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    force_upcast: bool = False
    latent_magnitude: float = 3.0
    latent_shift: float = 0.5

    def __post_init__(self) -> None:
        for kind in ("encoder", "decoder"):
            channels = getattr(self, f"{kind}_block_out_channels")
            blocks = getattr(self, f"num_{kind}_blocks")
            if len(channels) != len(blocks) or not channels:
                raise ValueError(f"{kind}_block_out_channels {channels} and num_{kind}_blocks"
                                 f" {blocks} must be non-empty and of the same length")
            if len(set(channels)) != 1:
                raise ValueError(f"{kind}_block_out_channels {channels}: every stage must have"
                                 " the same width (as in every released TAESD; diffusers'"
                                 " layout has no layer that changes the width between stages)")
        if len(self.encoder_block_out_channels) != len(self.decoder_block_out_channels):
            raise ValueError("the encoder and decoder need as many stages each (one per 2x)")


class TinyBlock(nn.Module):
    """relu(conv3(relu(conv2(relu(conv1(x))))) + skip(x)), named as diffusers' block."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class EncoderTiny(nn.Module):
    """images in [-1, 1] (B, 3, H, W) -> latents (B, C, H / 2**(stages-1), ...)."""

    def __init__(self, c: AutoencoderTinyConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (ch, n) in enumerate(zip(c.encoder_block_out_channels, c.num_encoder_blocks)):
            layers.append(nn.Conv2d(c.in_channels, ch, 3, padding=1) if i == 0 else
                          nn.Conv2d(ch, ch, 3, padding=1, stride=2, bias=False))
            layers += [TinyBlock(ch, ch) for _ in range(n)]
        layers.append(nn.Conv2d(c.encoder_block_out_channels[-1], c.latent_channels, 3,
                                padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers((x + 1) / 2)  # the network was trained on images in [0, 1]


class DecoderTiny(nn.Module):
    """latents (B, C, h, w) -> images in [-1, 1] (B, 3, h 2**(stages-1), ...)."""

    def __init__(self, c: AutoencoderTinyConfig) -> None:
        super().__init__()
        ch = c.decoder_block_out_channels
        layers: list[nn.Module] = [nn.Conv2d(c.latent_channels, ch[0], 3, padding=1), nn.ReLU()]
        for i, n in enumerate(c.num_decoder_blocks):
            last = i == len(ch) - 1
            layers += [TinyBlock(ch[i], ch[i]) for _ in range(n)]
            if not last:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            layers.append(nn.Conv2d(ch[i], c.out_channels if last else ch[i], 3, padding=1,
                                    bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        z = torch.tanh(z / TANH_RANGE) * TANH_RANGE
        return self.layers(z) * 2 - 1  # the network outputs images in [0, 1]


class AutoencoderTiny(LatentDiffusionVAE):
    """TAESD (see the module docstring)."""

    family = "autoencoder-tiny"

    def __init__(self, config: AutoencoderTinyConfig) -> None:
        super().__init__(config)
        self.encoder = EncoderTiny(config)
        self.decoder = DecoderTiny(config)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.encoder_block_out_channels) - 1)

    @property
    def encoder_output_names(self) -> tuple[str, ...]:
        return ("latents",)

    def _encode_outputs(self, x: Tensor) -> tuple[Tensor]:
        return (self.encoder(x),)

    def _posterior(self, outputs: tuple[Tensor, ...]) -> DiagonalGaussian:
        latents = outputs[0]
        return DiagonalGaussian(latents, torch.full_like(latents, -torch.inf))

    def _decode_logits(self, z: Tensor, y: Tensor | None) -> Tensor:
        return self.decoder(z)


AUTOENCODER_TINY_FAMILY = Family(
    "autoencoder-tiny",
    AutoencoderTinyConfig,
    AutoencoderTiny,
    presets={
        "taesd": {"latent_channels": 4},
        "taesdxl": {"latent_channels": 4},
        "taef1": {"latent_channels": 16},
    },
)
