"""Building blocks shared by the image VAE families."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def mlp(sizes: tuple[int, ...], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers through `sizes`, with `activation` after every layer."""
    layers: list[nn.Module] = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(d_in, d_out), activation()]
    return nn.Sequential(*layers)


def require_classes(num_classes: int) -> None:
    """Configs of the conditional families: the label needs at least two classes."""
    if num_classes < 2:
        raise ValueError(f"a conditional VAE needs num_classes >= 2, got {num_classes}")


def one_hot(y: Tensor, num_classes: int, dtype) -> Tensor:
    """(B,) int labels -> (B, num_classes) one-hot in `dtype`."""
    return F.one_hot(y.long(), num_classes).to(dtype)


def conv_spatial_sizes(image_size: int, num_layers: int) -> list[int]:
    """Spatial size after each stride-2, kernel-3, padding-1 convolution: s -> ceil(s / 2)."""
    sizes = [image_size]
    for _ in range(num_layers):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def down_block(c_in: int, c_out: int) -> nn.Sequential:
    """Stride-2 conv, BatchNorm, LeakyReLU: (B, c_in, s, s) -> (B, c_out, ceil(s/2), ceil(s/2))."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.LeakyReLU()
    )


def up_block(c_in: int, c_out: int, s_in: int, s_out: int) -> nn.Sequential:
    """Stride-2 transposed conv hitting `s_out` exactly: out = 2 s_in - 1 + output_padding."""
    output_padding = s_out - (2 * s_in - 1)
    if output_padding not in (0, 1):
        raise ValueError(f"cannot upsample {s_in} -> {s_out} with one stride-2 layer")
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=output_padding),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(),
    )


class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), as in the VQ-VAE paper's encoder and decoder."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)
