"""Tile geometry for exact tiled convolution: which input window each output tile reads.

Along one axis a convolution with kernel k, stride s and zero padding (p_lo, p_hi) maps an input
of n rows to  n_out = (n + p_lo + p_hi - k) // s + 1  rows, and output rows [o0, o1) read the
conv-input rows

    [o0 s - p_lo,  (o1 - 1) s - p_lo + k).

Rows of that window outside [0, n) are the conv's padding: they are zeros, and they occur only at
the true border of the map, never at a tile border (a tile border reads its neighbour's rows, the
halo). So a tile computed with `padding=0` on its zero-filled window equals the same rows of the
whole-map conv, up to the order of float sums.

A nearest 2x upsample in front of the conv (the decoder's Upsample2D) is folded in: conv-input row
r is stored row r // 2, so the window is read from the stored map at half resolution, upsampled,
and cropped. The downsampler's asymmetric F.pad(0, 1, 0, 1) is the padding (0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Axis:
    """Convolution geometry along one spatial axis."""

    kernel: int
    stride: int
    pad_lo: int
    pad_hi: int

    def out_size(self, n_in: int) -> int:
        """Rows the conv produces from `n_in` input rows."""
        return (n_in + self.pad_lo + self.pad_hi - self.kernel) // self.stride + 1

    def window(self, o0: int, o1: int) -> tuple[int, int]:
        """Conv-input rows [a, b) that output rows [o0, o1) read; may reach outside the map."""
        return o0 * self.stride - self.pad_lo, (o1 - 1) * self.stride - self.pad_lo + self.kernel


@dataclass(frozen=True)
class Window:
    """How to build a conv-input window [a, b) from a stored map along one axis.

    read:  stored rows [r0, r1) to fetch (at the stored, pre-upsample resolution)
    crop:  rows [c0, c1) of the fetched rows after upsampling that lie inside [a, b)
    pad:   zero rows (before, after) for the part of [a, b) outside the map
    """

    read: tuple[int, int]
    crop: tuple[int, int]
    pad: tuple[int, int]


def source_window(a: int, b: int, n_stored: int, up: int) -> Window:
    """The Window for conv-input rows [a, b) when the conv input is the stored map of `n_stored`
    rows upsampled `up` times (nearest); `up` = 1 means no upsampling."""
    lo, hi = max(a, 0), min(b, up * n_stored)
    if hi <= lo:  # the window lies wholly in the padding: read nothing, all zeros
        return Window((0, 0), (0, 0), (b - a, 0))
    r0, r1 = lo // up, -(-hi // up)
    return Window((r0, r1), (lo - up * r0, hi - up * r0), (lo - a, b - hi))


def tile_ranges(n: int, tile: int) -> list[tuple[int, int]]:
    """Split [0, n) into consecutive ranges of `tile` rows (the last may be shorter)."""
    return [(i, min(i + tile, n)) for i in range(0, n, tile)]


@dataclass(frozen=True)
class ConvSpec:
    """A Conv2d's weights and its geometry, with any explicit F.pad folded into the padding."""

    weight: Tensor  # (C_out, C_in, kh, kw)
    bias: Tensor | None  # (C_out,)
    rows: Axis
    cols: Axis

    @classmethod
    def of(cls, conv: nn.Conv2d, extra_pad: tuple[int, int, int, int] = (0, 0, 0, 0)) -> ConvSpec:
        """Read a Conv2d; `extra_pad` = (left, right, top, bottom) zeros padded before it."""
        if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros":
            raise ValueError(f"tiling supports plain convs (groups=1, dilation=1, zero padding); "
                             f"got {conv}")
        if isinstance(conv.padding, str):
            raise ValueError(f"tiling needs explicit integer padding, got padding={conv.padding!r}")
        (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
        left, right, top, bottom = extra_pad
        return cls(conv.weight, conv.bias, Axis(kh, sh, ph + top, ph + bottom),
                   Axis(kw, sw, pw + left, pw + right))

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    def out_hw(self, h: int, w: int, up: int = 1) -> tuple[int, int]:
        """Output size for a stored (h, w) map upsampled `up` times before the conv."""
        return self.rows.out_size(up * h), self.cols.out_size(up * w)

    def apply(self, window: Tensor) -> Tensor:
        """The conv on a window that already holds its halo and zero padding: (B, C_in, a, b)."""
        stride = (self.rows.stride, self.cols.stride)
        return F.conv2d(window, self.weight, self.bias, stride)
