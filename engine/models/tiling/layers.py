"""The layers a tiled schedule runs, each over a whole map tile by tile, and the walker.

Each layer reads the module's own parameters (never its forward), so any module tree with
diffusers' attribute names runs here: ours (engine.models) and diffusers' alike.

  ConvLayer       [GroupNorm + act | act] -> [nearest upsample] -> conv -> [pointwise post]
  ResnetLayer     ResnetBlock2D: norm1, act, conv1, norm2, act, conv2, + shortcut(x)
  AttentionLayer  the mid-block Attention (attention.py)
  TinyBlockLayer  AutoencoderTinyBlock: fuse(conv(x) + skip(x)), conv a Sequential of convs

`in_groups` is the GroupNorm group count a layer normalizes its input with (None: it does
not); the walker asks each layer to gather that many groups' statistics of its output for the
next layer, so no map is ever read twice for its statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch.nn.functional as F
from torch import nn

from engine.models.tiling.attention import run_attention
from engine.models.tiling.geometry import ConvSpec, tile_ranges
from engine.models.tiling.groupnorm import StatsAccumulator, group_norm_tile
from engine.models.tiling.stages import Context, Feature, Pointwise, Residual, run_conv

# Modules that act on each value alone; they commute with windows and nearest upsampling.
POINTWISE_MODULES = (nn.ReLU, nn.SiLU, nn.GELU, nn.Mish, nn.LeakyReLU, nn.Tanh, nn.Sigmoid,
                     nn.Identity)


def compose(first: Pointwise | None, then: Pointwise | None) -> Pointwise | None:
    """x -> then(first(x)), where a None is skipped."""
    if first is None or then is None:
        return first or then
    return lambda x: then(first(x))


def _in_place(act: Pointwise | None) -> Pointwise | None:
    """SiLU / ReLU applied in place (on a fresh tensor: one tile buffer fewer); others as is."""
    if isinstance(act, nn.SiLU) or act is F.silu:
        return lambda t: F.silu(t, inplace=True)
    if isinstance(act, nn.ReLU) or act is F.relu:
        return lambda t: F.relu(t, inplace=True)
    return act


def norm_act(norm: nn.GroupNorm | None, act: Pointwise | None, src: Feature) -> Pointwise | None:
    """act(GroupNorm(x)) with `src`'s whole-map statistics, as a pointwise function of a tile."""
    if norm is None:
        return act
    stats = src.stats
    return compose(lambda t: group_norm_tile(t, stats, norm), _in_place(act))


def activation_of(module: nn.Module, name: str) -> Pointwise:
    """The activation module `module.<name>` where the tree has one, else SiLU (diffusers')."""
    act = getattr(module, name, None)
    return act if act is not None else F.silu


def _check_no(module: nn.Module, names: tuple[str, ...], where: str) -> None:
    for name in names:
        if getattr(module, name, None) not in (None, False):
            raise ValueError(f"tiling does not support {where} with {name}={getattr(module, name)}")


@dataclass(frozen=True)
class ConvLayer:
    """A conv with a pointwise pre (act(norm(x)), or act alone), an optional nearest upsample
    of factor `up` before it, and a pointwise `post` after it."""

    conv: ConvSpec
    norm: nn.GroupNorm | None = None
    act: Pointwise | None = None
    up: int = 1
    post: Pointwise | None = None

    @property
    def in_groups(self) -> int | None:
        return None if self.norm is None else self.norm.num_groups

    def out_tile(self, tile: int) -> int:
        return max(1, tile * self.up // self.conv.rows.stride)

    def run(self, ctx: Context, x: Feature, tile: int, groups: int | None,
            residual: Residual | None = None, post: Pointwise | None = None) -> Feature:
        return run_conv(ctx, x, self.conv, tile, pre=norm_act(self.norm, self.act, x), up=self.up,
                        post=compose(self.post, post), residual=residual, groups=groups)


@dataclass(frozen=True)
class ResnetLayer:
    """out = (shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))))))) / output_scale_factor, as
    two tiled conv stages with the inner map parked between them."""

    block: nn.Module  # norm1, conv1, norm2, conv2, conv_shortcut (None or 1x1), nonlinearity

    @property
    def in_groups(self) -> int:
        return self.block.norm1.num_groups

    def out_tile(self, tile: int) -> int:
        return tile

    def _shortcut(self) -> ConvSpec | None:
        conv = getattr(self.block, "conv_shortcut", None)
        if conv is None:
            return None
        spec = ConvSpec.of(conv)
        if spec.weight.shape[-2:] != (1, 1) or spec.rows.stride != 1 or spec.rows.pad_lo != 0:
            raise ValueError(f"tiling supports 1x1 resnet shortcuts only, got {conv}")
        return spec

    def run(self, ctx: Context, x: Feature, tile: int, groups: int | None) -> Feature:
        block = self.block
        _check_no(block, ("upsample", "downsample", "time_emb_proj"), "a ResnetBlock2D")
        act = activation_of(block, "nonlinearity")
        first = ConvLayer(ConvSpec.of(block.conv1), block.norm1, act)
        second = ConvLayer(ConvSpec.of(block.conv2), block.norm2, act)
        h = first.run(ctx, x, tile, second.in_groups)
        scale = float(getattr(block, "output_scale_factor", 1.0))
        return second.run(ctx, h, tile, groups, residual=Residual(x, self._shortcut(), scale))


@dataclass(frozen=True)
class AttentionLayer:
    """The mid-block attention over the whole map (attention.py)."""

    attn: nn.Module

    @property
    def in_groups(self) -> int | None:
        norm = getattr(self.attn, "group_norm", None)
        return None if norm is None else norm.num_groups

    def out_tile(self, tile: int) -> int:
        return tile

    def run(self, ctx: Context, x: Feature, tile: int, groups: int | None) -> Feature:
        return run_attention(ctx, x, self.attn, tile, groups)


@dataclass(frozen=True)
class TinyBlockLayer:
    """out = fuse(convs(x) + skip(x)), each conv of the chain a tiled stage."""

    convs: tuple[ConvLayer, ...]  # the block's `conv` Sequential, activations folded in
    skip: ConvSpec | None
    fuse: Pointwise

    in_groups = None

    def out_tile(self, tile: int) -> int:
        return tile

    def run(self, ctx: Context, x: Feature, tile: int, groups: int | None) -> Feature:
        h = x
        for layer in self.convs[:-1]:
            h = layer.run(ctx, h, tile, None)
        return self.convs[-1].run(ctx, h, tile, groups, residual=Residual(x, self.skip),
                                  post=self.fuse)


Layer = ConvLayer | ResnetLayer | AttentionLayer | TinyBlockLayer


def gather_stats(ctx: Context, x: Feature, groups: int, tile: int) -> None:
    """Fill x.stats by one pass over its tiles (only for an input the walker did not produce)."""
    acc = StatsAccumulator(groups)
    for rows in tile_ranges(x.data.shape[-2], tile):
        for cols in tile_ranges(x.data.shape[-1], tile):
            acc.add(ctx.fetch(x, rows, cols))
    x.stats = acc.result()


def run_layers(ctx: Context, x: Feature, layers: list[Layer], tile: int) -> Feature:
    """Run `layers` in order over the whole map; `tile` is the tile side at x's resolution."""
    first_groups = layers[0].in_groups
    if first_groups is not None and (x.stats is None or x.stats.groups != first_groups):
        gather_stats(ctx, x, first_groups, tile)
    for i, layer in enumerate(layers):
        next_groups = layers[i + 1].in_groups if i + 1 < len(layers) else None
        tile = layer.out_tile(tile)
        x = layer.run(ctx, x, tile, next_groups)
    return x


def with_pre(layers: list[Layer], pre: Pointwise) -> list[Layer]:
    """Apply a pointwise `pre` to the input of the first layer (a plain ConvLayer)."""
    first = layers[0]
    if not isinstance(first, ConvLayer) or first.norm is not None:
        raise ValueError(f"expected the first layer to be a convolution, got {first}")
    return [replace(first, act=compose(pre, first.act)), *layers[1:]]


def with_post(layers: list[Layer], post: Pointwise) -> list[Layer]:
    """Apply a pointwise `post` to the output of the last layer (a ConvLayer)."""
    last = layers[-1]
    if not isinstance(last, ConvLayer):
        raise ValueError(f"expected the last layer to be a convolution, got {last}")
    return [*layers[:-1], replace(last, post=compose(last.post, post))]

