"""AutoencoderKL, the first stage of latent diffusion (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models", https://arxiv.org/abs/2112.10752), with the
module tree and parameter names of diffusers' `AutoencoderKL`, so its weights load unchanged.

    encoder   x (B, 3, H, W) -> conv_in -> down_blocks[i] (ResnetBlocks, Downsample but the
              last) -> mid_block (resnet, attention, resnet) -> silu(conv_norm_out) -> conv_out
              -> (B, 2C, H/8, W/8) -> quant_conv (1x1, optional) -> (mean, logvar), each
              (B, C, H/8, W/8); logvar clamped to [-30, 20] as diffusers does
    decoder   z (B, C, h, w) -> post_quant_conv (1x1, optional) -> conv_in -> mid_block ->
              up_blocks[i] (layers_per_block + 1 ResnetBlocks, Upsample but the last; deepest
              channels first) -> silu(conv_norm_out) -> conv_out -> (B, 3, 8h, 8w) in [-1, 1]

Downsampling pads (0, 1, 0, 1) (right and bottom) before a 3x3 stride-2 conv with no padding;
upsampling is nearest 2x then a 3x3 conv (see blocks.py). With len(block_out_channels) = 4
levels the factor is 2**3 = 8.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from engine.distributions import DiagonalGaussian
from engine.models.base import Family
from engine.models.latent_diffusion.base import LatentDiffusionVAE
from engine.models.latent_diffusion.blocks import (
    DownEncoderBlock,
    MidBlock,
    UpDecoderBlock,
    group_norm,
    norm_silu,
)

LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps to this


@dataclass(frozen=True)
class AutoencoderKLConfig:
    """Configuration of `AutoencoderKL` (field names as in diffusers' config.json).

    in_channels, out_channels:  image channels (3).
    block_out_channels:  channels of each encoder level (the decoder walks them backwards);
                         len - 1 stride-2 levels, so 4 levels downsample by 8.
    layers_per_block:    ResnetBlocks per encoder level (the decoder has one more per level).
    latent_channels:     C: 4 for SD 1.x / 2.x / SDXL, 16 for SD3 / FLUX.
    norm_num_groups:     GroupNorm groups (32 in every released VAE; not readable from shapes).
    scaling_factor, shift_factor:  diffusion latents = (z - shift) * scaling.
    force_upcast:        fp16 requests run in fp32 (see precision.py).
    use_quant_conv, use_post_quant_conv:  the 1x1 convs around the latent (absent in SD3/FLUX).
    mid_block_add_attention:  the mid blocks' self-attention.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        if not self.block_out_channels or self.layers_per_block < 1:
            raise ValueError("AutoencoderKL needs at least one level and one layer per block, got"
                             f" block_out_channels={self.block_out_channels},"
                             f" layers_per_block={self.layers_per_block}")
        if self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2C, H/f, W/f): the posterior's mean and logvar stacked."""

    def __init__(self, c: AutoencoderKLConfig) -> None:
        super().__init__()
        ch, groups = c.block_out_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [DownEncoderBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, groups,
                              downsample=i < len(ch) - 1) for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], groups, c.mid_block_add_attention)
        self.conv_norm_out = group_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(norm_silu(self.conv_norm_out, h))


class Decoder(nn.Module):
    """(B, C, h, w) -> (B, out_channels, f h, f w)."""

    def __init__(self, c: AutoencoderKLConfig) -> None:
        super().__init__()
        rev, groups = tuple(reversed(c.block_out_channels)), c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            [UpDecoderBlock(rev[max(i - 1, 0)], rev[i], c.layers_per_block + 1, groups,
                            upsample=i < len(rev) - 1) for i in range(len(rev))])
        self.conv_norm_out = group_norm(rev[-1], groups)
        self.conv_out = nn.Conv2d(rev[-1], c.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(norm_silu(self.conv_norm_out, h))


class AutoencoderKL(LatentDiffusionVAE):
    """The KL-regularized autoencoder of latent diffusion (see the module docstring)."""

    family = "autoencoder-kl"

    def __init__(self, config: AutoencoderKLConfig) -> None:
        super().__init__(config)
        c2 = 2 * config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(c2, c2, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c2 // 2, c2 // 2, 1) if config.use_post_quant_conv \
            else None

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def encoder_output_names(self) -> tuple[str, ...]:
        return ("mean", "logvar")

    def _encode_outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W) -> (mean, logvar), each (B, C, H/f, W/f)."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def _encode_params(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._encode_outputs(x)

    def _posterior(self, outputs: tuple[Tensor, ...]) -> DiagonalGaussian:
        return DiagonalGaussian(*outputs)

    def _decode_logits(self, z: Tensor, y: Tensor | None) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


_SD = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2}
AUTOENCODER_KL_FAMILY = Family(
    "autoencoder-kl",
    AutoencoderKLConfig,
    AutoencoderKL,
    presets={
        # SD 1.x / 2.x (e.g. vae-ft-mse-840000-ema): the diffusers config sets no force_upcast,
        # whose default is true.
        "sd15": {**_SD, "latent_channels": 4, "scaling_factor": 0.18215},
        "sdxl": {**_SD, "latent_channels": 4, "scaling_factor": 0.13025},
        "sd3": {**_SD, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
                "use_quant_conv": False, "use_post_quant_conv": False},
        "flux": {**_SD, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
                 "use_quant_conv": False, "use_post_quant_conv": False},
    },
)

