"""One layer over a whole map, one output tile at a time: the convolution stage.

A stage reads a parked map (`Feature`), and for each output tile fetches the input window with its
halo (geometry.py), applies a pointwise `pre` (GroupNorm with the whole map's statistics and the
activation, or a plain activation), upsamples it when the layer does, pads zeros where the window
leaves the map, convolves with padding 0, adds the residual, applies a pointwise `post`, records
the tile's GroupNorm statistics for the next layer, and writes the tile into the output map.

Pointwise operations commute with nearest upsampling and with taking a window, and the zeros are
added after `pre`, where the whole-map conv pads its own input; so every output value is the one
the whole-map layer computes, up to the order of float sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.models.tiling.geometry import ConvSpec, Window, source_window, tile_ranges
from engine.models.tiling.groupnorm import GroupStats, StatsAccumulator
from engine.models.tiling.memory import allocate_map, batch_slices, parks_on_host

Pointwise = Callable[[Tensor], Tensor]
Span = tuple[int, int]


@dataclass
class Feature:
    """A full activation map (B, C, H, W), on the compute device or parked on the host, with
    the GroupNorm statistics its next layer needs (None when that layer does not normalize)."""

    data: Tensor
    parked: bool = False
    stats: GroupStats | None = None


@dataclass(frozen=True)
class Context:
    """Where tiles are computed (`device`) and the offload mode that places the full maps."""

    device: torch.device
    offload: str

    def new_map(self, shape: tuple[int, ...], dtype: torch.dtype) -> Feature:
        """An empty full map, parked on the host or not as the offload mode decides."""
        nbytes = math.prod(shape) * dtype.itemsize
        parked = parks_on_host(self.offload, self.device, nbytes)
        return Feature(allocate_map(shape, dtype, self.device, parked), parked)

    def fetch(self, feature: Feature, rows: Span, cols: Span) -> Tensor:
        """Rows and cols of a map on the compute device. A parked map is always copied, so a
        tile never aliases it and the device working set is the same where host = device."""
        window = feature.data[..., rows[0]:rows[1], cols[0]:cols[1]]
        return window.to(self.device, copy=True) if feature.parked else window


@dataclass(frozen=True)
class Residual:
    """out = (shortcut(x) + conv(...)) / out_scale; shortcut: a 1x1 ConvSpec or None (identity)."""

    feature: Feature
    shortcut: ConvSpec | None = None
    out_scale: float = 1.0

    def add(self, ctx: Context, y: Tensor, rows: Span, cols: Span) -> Tensor:
        x = ctx.fetch(self.feature, rows, cols)
        if self.shortcut is not None:
            x = self.shortcut.apply(x)
        y = y.add_(x)  # y is the conv's fresh output: in place saves a tile buffer
        return y if self.out_scale == 1.0 else y.div_(self.out_scale)


def _padded_window(x: Tensor, up: int, rows: Window, cols: Window) -> Tensor:
    """Upsample a fetched window `up` times (nearest), crop it and pad the border zeros."""
    if up > 1:  # an empty window (wholly in the padding) keeps its shape arithmetic
        x = (F.interpolate(x, scale_factor=float(up), mode="nearest") if x.numel() else
             x.new_empty(*x.shape[:2], up * x.shape[2], up * x.shape[3]))
    x = x[..., rows.crop[0]:rows.crop[1], cols.crop[0]:cols.crop[1]]
    return F.pad(x, (cols.pad[0], cols.pad[1], rows.pad[0], rows.pad[1]))


def _conv_tile(ctx: Context, src: Feature, conv: ConvSpec, up: int, rows: Window, cols: Window,
               pre: Pointwise | None) -> Tensor:
    """The conv's output on one tile, the batch split where the upsample would pass 2^31.

    Each intermediate is dropped as soon as the next exists, so at most the window, its
    upsampled copy and the padded one (or the padded one and the output) are alive at once.
    """
    x = ctx.fetch(src, rows.read, cols.read)
    if pre is not None:
        x = pre(x)
    slices = batch_slices(len(x), x[0].numel() * up * up) if up > 1 else [slice(None)]
    if len(slices) == 1:
        x = _padded_window(x, up, rows, cols)
        return conv.apply(x)
    return torch.cat([conv.apply(_padded_window(x[s], up, rows, cols)) for s in slices])


def run_conv(ctx: Context, src: Feature, conv: ConvSpec, tile: int, *, pre: Pointwise | None = None,
             up: int = 1, post: Pointwise | None = None, residual: Residual | None = None,
             groups: int | None = None) -> Feature:
    """y = post(residual(conv(zero_pad(upsample(pre(x)))))) over the whole map, tile by tile.

    tile:   output tile side in pixels of this layer's output
    up:     nearest upsampling factor before the conv (1: none)
    groups: gather the output's GroupNorm statistics for this many groups (None: do not)
    """
    b, _, h, w = src.data.shape
    out_h, out_w = conv.out_hw(h, w, up)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"a {h}x{w} map is too small for the conv {tuple(conv.weight.shape)}: "
                         "use a larger input")
    out = ctx.new_map((b, conv.out_channels, out_h, out_w), src.data.dtype)
    acc = StatsAccumulator(groups)
    for o0, o1 in tile_ranges(out_h, tile):
        rows = source_window(*conv.rows.window(o0, o1), h, up)
        for p0, p1 in tile_ranges(out_w, tile):
            cols = source_window(*conv.cols.window(p0, p1), w, up)
            y = _conv_tile(ctx, src, conv, up, rows, cols, pre)
            if residual is not None:
                y = residual.add(ctx, y, (o0, o1), (p0, p1))
            if post is not None:
                y = post(y)
            acc.add(y)
            out.data[..., o0:o1, p0:p1].copy_(y)
            del y  # not alive while the next tile is computed
    out.stats = acc.result()
    return out
