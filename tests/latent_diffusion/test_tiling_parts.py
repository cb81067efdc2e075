"""The parts of the tiled schedule against independent references: windows against padding and
upsampling the whole map, tiled convs against F.conv2d, the GroupNorm merge against float64
torch.var_mean of the concatenated values, streamed attention against SDPA, and the memory
policy's decisions."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.models.tiling.attention import streamed_attention
from engine.models.tiling.geometry import ConvSpec, source_window, tile_ranges
from engine.models.tiling.groupnorm import GroupStats, group_norm_tile, merge_all
from engine.models.tiling.memory import batch_slices, parks_on_host
from engine.models.tiling.stages import Context, Feature, Residual, run_conv
from engine.models.tiling.trees import sequential_layers

CPU = Context(torch.device("cpu"), "none")


@pytest.mark.parametrize("up", [1, 2, 3])
def test_source_window_equals_slicing_the_padded_upsampled_map(up):
    """For every window [a, b), fetch + upsample + crop + pad == slicing the whole map after
    upsampling and padding it with zeros."""
    for _ in range(200):
        n = random.randint(1, 9)
        a = random.randint(-3, up * n + 1)
        b = random.randint(a + 1, up * n + 4)
        x = torch.arange(1.0, n + 1)
        lo = 5
        whole = F.pad(x.repeat_interleave(up), (lo, lo))[a + lo:b + lo]
        win = source_window(a, b, n, up)
        part = x[win.read[0]:win.read[1]].repeat_interleave(up)[win.crop[0]:win.crop[1]]
        assert torch.equal(F.pad(part, win.pad), whole), (a, b, n, up, win)


def _random_conv_case() -> tuple[nn.Conv2d, tuple[int, int, int, int], int, torch.Tensor, int]:
    """A random conv (kernel, stride, padding, extra asymmetric pad), upsample, map and tile."""
    k = random.choice([1, 3, 5])
    stride = random.choice([1, 2])
    conv = nn.Conv2d(3, 4, k, stride=stride, padding=random.randint(0, k // 2)).double()
    extra = random.choice([(0, 0, 0, 0), (0, 1, 0, 1), (1, 0, 2, 1)])
    up = random.choice([1, 2])
    h, w = random.randint(k, 11), random.randint(k, 11)
    return conv, extra, up, torch.randn(2, 3, h, w, dtype=torch.float64), random.randint(1, 6)


def _padding_only_case():
    """Output row 0 and column 0 read only padding (top pad 3 and left pad 2 for a 3x3 kernel)."""
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    return conv, (1, 0, 2, 1), 2, torch.randn(2, 3, 4, 5, dtype=torch.float64), 1


@pytest.mark.parametrize("case", ["padding-only"] + [f"random{i}" for i in range(6)])
def test_run_conv_equals_the_whole_map_conv(case):
    """Tiled: pre -> upsample -> pad -> conv -> residual -> post, against torch on the whole map."""
    conv, extra, up, x, tile = _padding_only_case() if case == "padding-only" else (
        _random_conv_case())
    pre, post = torch.tanh, torch.relu
    whole = F.interpolate(pre(x), scale_factor=up, mode="nearest") if up > 1 else pre(x)
    ref = conv(F.pad(whole, extra))
    skip = nn.Conv2d(3, 4, 1).double()
    residual_in = torch.randn(2, 3, *ref.shape[-2:], dtype=torch.float64)
    ref = post((skip(residual_in) + ref) / 2.0)
    out = run_conv(CPU, Feature(x), ConvSpec.of(conv, extra), tile, pre=pre, up=up, post=post,
                   residual=Residual(Feature(residual_in), ConvSpec.of(skip), 2.0), groups=2)
    assert (out.data - ref).abs().max().item() < 1e-12
    stats = out.stats
    var, mean = torch.var_mean(ref.reshape(2, 2, -1), -1, correction=0)
    assert torch.allclose(stats.mean, mean) and torch.allclose(stats.variance(), var)


def _random_tiles(x: torch.Tensor) -> list[torch.Tensor]:
    """Cut x: (B, C, H, W) into a random grid of tiles."""
    rows = sorted(random.sample(range(1, x.shape[2]), random.randint(0, 4)))
    cols = sorted(random.sample(range(1, x.shape[3]), random.randint(0, 4)))
    r_edges, c_edges = [0, *rows, x.shape[2]], [0, *cols, x.shape[3]]
    return [x[..., r0:r1, c0:c1] for r0, r1 in zip(r_edges, r_edges[1:])
            for c0, c1 in zip(c_edges, c_edges[1:])]


@pytest.mark.parametrize("trial", range(5))
def test_groupnorm_merge_equals_float64_statistics_of_the_whole(trial):
    """Chan's merge over a random tiling == torch.var_mean of the concatenation, in float64;
    a merge without the between-tile term (A1111's Tiled VAE, DistVAE) is far off."""
    groups = random.choice([1, 2, 4])
    x = torch.randn(2, 8, 13, 11) * 0.3
    x[..., :6, :] += 2.0  # tiles with different means: the between-tile term matters
    tiles = _random_tiles(x)
    random.shuffle(tiles)
    merged = merge_all(GroupStats.of(t, groups) for t in tiles)
    var, mean = torch.var_mean(x.double().reshape(2, groups, -1), -1, correction=0)
    assert (merged.mean - mean).abs().max() < 1e-6
    assert (merged.variance() - var).abs().max() < 1e-6 * var.max()
    if len(tiles) > 1:
        naive = sum(GroupStats.of(t, groups).m2 for t in tiles) / x[0, 0].numel() / (8 // groups)
        assert (naive - var).abs().max() > 1e3 * (merged.variance() - var).abs().max()


def test_group_norm_tile_with_merged_stats_equals_group_norm_of_the_whole():
    norm = nn.GroupNorm(4, 8, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 8, 9, 10, dtype=torch.float64) + torch.linspace(-2, 2, 10)
    stats = merge_all(GroupStats.of(t, 4) for t in _random_tiles(x))
    tiled = torch.cat([group_norm_tile(x[..., r0:r1, :], stats, norm)
                       for r0, r1 in tile_ranges(9, 4)], dim=2)
    assert (tiled - norm(x)).abs().max().item() < 1e-6


def test_streamed_attention_equals_sdpa():
    q = torch.randn(2, 1, 7, 16, dtype=torch.float64) * 3
    k = torch.randn(2, 1, 23, 16, dtype=torch.float64) * 3
    v = torch.randn(2, 1, 23, 16, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, k, v)
    host = Context(torch.device("cpu"), "host")
    for chunk in (1, 5, 23, 64):
        out = streamed_attention(host, q, Feature(k, parked=True), Feature(v, parked=True), chunk)
        assert (out - ref).abs().max().item() < 1e-5, chunk  # float32 inside


def test_offload_decisions():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert parks_on_host("host", cpu, 1) and not parks_on_host("none", cuda, 10**15)
    assert not parks_on_host("auto", cpu, 10**15)  # host and device coincide
    assert parks_on_host("auto", cuda, 600, free_bytes=1000)
    assert not parks_on_host("auto", cuda, 400, free_bytes=1000)
    with pytest.raises(ValueError, match="offload"):
        parks_on_host("disk", cpu, 1)


def test_batch_slices_cover_the_batch_within_the_limit(monkeypatch):
    from engine.models.tiling import memory

    monkeypatch.setattr(memory, "UPSAMPLE_ELEMENT_LIMIT", 1000)
    slices = batch_slices(7, 300)
    assert [(s.start, s.stop) for s in slices] == [(0, 3), (3, 6), (6, 7)]
    assert batch_slices(7, 100)[0] == slice(0, 7)
    with pytest.raises(ValueError, match="tile_size"):
        batch_slices(1, 1001)


@pytest.mark.parametrize("module, words", [
    (nn.Upsample(scale_factor=2, mode="bilinear"), "nearest"),
    (nn.BatchNorm2d(3), "cannot walk"),
    (nn.Conv2d(3, 3, 3, padding=2, dilation=2), "dilation"),
])
def test_unsupported_layers_are_refused_with_one_line(module, words):
    seq = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), module, nn.Conv2d(3, 3, 3, padding=1))
    with pytest.raises(ValueError) as info:
        sequential_layers(seq, "decoder.layers")
    assert words in str(info.value) and "\n" not in str(info.value)
