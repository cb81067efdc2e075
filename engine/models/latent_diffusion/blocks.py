"""Building blocks of the latent-diffusion AutoencoderKL, named as diffusers names them.

Every module below has exactly the parameter names of its diffusers counterpart, so a
diffusers state dict loads with no renaming, and `engine.models.tiling` can walk the tree.

    ResnetBlock      x -> conv2(silu(gn2(conv1(silu(gn1(x)))))) + shortcut(x)
                     shortcut: 1x1 `conv_shortcut` when channels change, else identity
    Downsample       F.pad(x, (0, 1, 0, 1)) then a 3x3 stride-2 conv with no padding:
                     (B, C, H, W) -> (B, C, floor(H / 2), floor(W / 2)); the pad is on the right
                     and bottom only (the LDM convention), so the sampling grid is not centred
    Upsample         nearest-neighbour 2x (each pixel copied to a 2x2 block), then a 3x3 conv
    MidAttention     single-head self-attention over the H*W positions, C channels per head:
                     h = gn(x) -> (B, HW, C);  q, k, v = h W_q^T + b_q, ...  (Linear layers)
                     out = to_out(softmax(q k^T / sqrt(C)) v) -> (B, C, H, W) + x
                     through F.scaled_dot_product_attention
    MidBlock         resnets[0] -> attentions[0] -> resnets[1]

Every GroupNorm uses eps = 1e-6 and `norm_num_groups` groups (read them from the
nn.GroupNorm modules). Each "GroupNorm then SiLU" pair goes through `norm_silu`, the one place
a fused kernel is switched in.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

import kernels

GN_EPS = 1e-6


def norm_silu(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """silu(group_norm(x)): (B, C, H, W) -> (B, C, H, W), through the fused GroupNorm + SiLU op
    (Triton on CUDA or under TRITON_INTERPRET=1, else F.group_norm then F.silu; the reference
    while exporting)."""
    return kernels.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"norm_num_groups={groups} must divide every block's channel count;"
                         f" {channels} is not a multiple of {groups}")
    return nn.GroupNorm(groups, channels, eps=GN_EPS)


class ResnetBlock(nn.Module):
    """Pre-norm residual block (diffusers' ResnetBlock2D without a time embedding)."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(norm_silu(self.norm1, x))
        h = self.conv2(norm_silu(self.norm2, h))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """(B, C, H, W) -> (B, C, floor(H/2), floor(W/2)): pad right/bottom by 1, 3x3 stride 2."""

    PAD = (0, 1, 0, 1)  # (left, right, top, bottom)

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.PAD))


class Upsample(nn.Module):
    """(B, C, H, W) -> (B, C, 2H, 2W): nearest 2x, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidAttention(nn.Module):
    """Single-head spatial self-attention with a residual connection (see the module doc)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        a = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C)
        out = self.to_out[0](a).transpose(1, 2).reshape(b, c, h, w)
        return out + x


class MidBlock(nn.Module):
    """resnets[0] -> attentions[0] (when `attention`) -> resnets[1], at constant channels."""

    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([MidAttention(channels, groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class _Level(nn.Module):
    """`layers` ResnetBlocks (c_in -> c_out first), then the level's resampler, if any."""

    def __init__(self, c_in: int, c_out: int, layers: int, groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(layers)])

    def resampler(self) -> nn.ModuleList | None:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        resample = self.resampler()
        return x if resample is None else resample[0](x)


class DownEncoderBlock(_Level):
    """An encoder level: ResnetBlocks, then a Downsample (`downsamplers[0]`) unless last."""

    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, downsample: bool) -> None:
        super().__init__(c_in, c_out, layers, groups)
        self.downsamplers = nn.ModuleList([Downsample(c_out)]) if downsample else None

    def resampler(self) -> nn.ModuleList | None:
        return self.downsamplers


class UpDecoderBlock(_Level):
    """A decoder level: ResnetBlocks, then an Upsample (`upsamplers[0]`) unless last."""

    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, upsample: bool) -> None:
        super().__init__(c_in, c_out, layers, groups)
        self.upsamplers = nn.ModuleList([Upsample(c_out)]) if upsample else None

    def resampler(self) -> nn.ModuleList | None:
        return self.upsamplers
