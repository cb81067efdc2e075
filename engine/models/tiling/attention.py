"""The mid-block self-attention over the whole map, computed one query tile at a time.

The VAE's attention (diffusers' Attention with residual_connection, one head of all C channels)
is global: every output pixel attends to every pixel of the map, so cutting the map into tiles
and attending within each (what A1111's Tiled VAE and DistVAE do) changes the result. Here

    x_n = GroupNorm(x)  (whole-map statistics),   q, k, v = x_n W_q, x_n W_k, x_n W_v,
    y = x + (softmax(q k^T / sqrt(d)) v) W_o,   divided by rescale_output_factor,

with the keys and values of the whole map gathered first (pass 1, tile by tile) and the queries
taken one tile at a time (pass 2), which is exact. It runs at the latent resolution (a 1024 px
image has a 128x128 latent), so the keys and values are two maps of that size. When they are
parked on the host they are streamed to the device in chunks and combined with the online
softmax (running maximum m, normaliser l, accumulator a; Milakov & Gimelshein 2018,
https://arxiv.org/abs/1805.02867), so the device holds one query tile and one key chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.models.tiling.geometry import tile_ranges
from engine.models.tiling.groupnorm import StatsAccumulator, group_norm_tile
from engine.models.tiling.stages import Context, Feature, Span

MIN_KEY_CHUNK = 1024  # keys streamed per step: few steps for small query tiles, small on device


def _linear(layer: nn.Module, x: Tensor) -> Tensor:
    return F.linear(x, layer.weight, layer.bias)


def _split_heads(t: Tensor, heads: int) -> Tensor:
    """(B, n, C) -> (B, heads, n, C / heads)."""
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def streamed_attention(ctx: Context, q: Tensor, keys: Feature, values: Feature,
                       chunk: int) -> Tensor:
    """softmax(q k^T / sqrt(d)) v with k, v read `chunk` tokens at a time; float32 inside.

    q: (B, h, n_q, d) on the device; keys, values: (B, h, N, d) maps, parked or not.
    """
    n = keys.data.shape[2]
    qf = q.float() * q.shape[-1] ** -0.5
    running_max = torch.full(q.shape[:-1], float("-inf"), device=q.device)
    norm = torch.zeros(q.shape[:-1], device=q.device)
    acc = torch.zeros(q.shape, device=q.device)
    for s0, s1 in tile_ranges(n, chunk):
        k = ctx.fetch(keys, (s0, s1), (0, keys.data.shape[-1])).float()
        v = ctx.fetch(values, (s0, s1), (0, values.data.shape[-1])).float()
        scores = qf @ k.transpose(-1, -2)  # (B, h, n_q, chunk)
        new_max = torch.maximum(running_max, scores.amax(-1))
        decay = (running_max - new_max).exp()
        p = (scores - new_max[..., None]).exp()
        norm = norm * decay + p.sum(-1)
        acc = acc * decay[..., None] + p @ v
        running_max = new_max
    return (acc / norm[..., None]).to(q.dtype)


def _tokens(ctx: Context, src: Feature, norm: nn.Module | None, rows: Span, cols: Span
            ) -> Tensor:
    """The (group-normalized) tokens of one tile: (B, h*w, C)."""
    x = ctx.fetch(src, rows, cols)
    if norm is not None:
        x = group_norm_tile(x, src.stats, norm)
    return x.flatten(2).transpose(1, 2)


def _keys_values(ctx: Context, src: Feature, attn: nn.Module,
                 tiles: list[tuple[Span, Span]]) -> tuple[Feature, Feature]:
    """Pass 1: the whole map's keys and values, (B, heads, H*W, d) each, in tile order."""
    b, c, h, w = src.data.shape
    heads = int(getattr(attn, "heads", 1))
    keys = ctx.new_map((b, heads, h * w, c // heads), src.data.dtype)
    values = ctx.new_map((b, heads, h * w, c // heads), src.data.dtype)
    start = 0
    for rows, cols in tiles:
        t = _tokens(ctx, src, getattr(attn, "group_norm", None), rows, cols)
        stop = start + t.shape[1]
        keys.data[:, :, start:stop].copy_(_split_heads(_linear(attn.to_k, t), heads))
        values.data[:, :, start:stop].copy_(_split_heads(_linear(attn.to_v, t), heads))
        start = stop
    return keys, values


def run_attention(ctx: Context, src: Feature, attn: nn.Module, tile: int,
                  groups: int | None = None) -> Feature:
    """y = (x + attention(GroupNorm(x))) / rescale over the whole map; see the module docstring.

    attn: a module with group_norm (or None), to_q, to_k, to_v, to_out[0] and optionally
    heads and rescale_output_factor; groups: gather the output's GroupNorm statistics.
    """
    if getattr(attn, "spatial_norm", None) is not None:
        raise ValueError("tiling does not support attention with a spatial norm (MoVQ decoders)")
    b, c, h, w = src.data.shape
    heads = int(getattr(attn, "heads", 1))
    tiles = [(r, k) for r in tile_ranges(h, tile) for k in tile_ranges(w, tile)]
    keys, values = _keys_values(ctx, src, attn, tiles)
    stream = keys.parked or values.parked
    rescale = float(getattr(attn, "rescale_output_factor", 1.0))
    out = ctx.new_map((b, c, h, w), src.data.dtype)
    acc = StatsAccumulator(groups)
    for rows, cols in tiles:
        tokens = _tokens(ctx, src, getattr(attn, "group_norm", None), rows, cols)
        q = _split_heads(_linear(attn.to_q, tokens), heads)
        if stream:
            o = streamed_attention(ctx, q, keys, values, chunk=max(q.shape[2], MIN_KEY_CHUNK))
        else:
            o = F.scaled_dot_product_attention(q, keys.data, values.data)
        o = _linear(attn.to_out[0], o.transpose(1, 2).reshape(b, -1, c))  # (B, n, C)
        th, tw = rows[1] - rows[0], cols[1] - cols[0]
        y = o.transpose(1, 2).reshape(b, c, th, tw) + ctx.fetch(src, rows, cols)
        if rescale != 1.0:
            y = y / rescale
        acc.add(y)
        out.data[..., rows[0]:rows[1], cols[0]:cols[1]].copy_(y)
        del tokens, q, o, y  # not alive while the next tile is computed
    out.stats = acc.result()
    return out
