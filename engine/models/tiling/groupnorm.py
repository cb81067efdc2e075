"""GroupNorm over a map seen one tile at a time: exact statistics by Chan's parallel merge.

GroupNorm normalizes each (sample b, group g) by the mean and the biased variance of all
C/G * H * W values of that group. A tile t holds n_t of them; it contributes

    n_t,   m_t = mean,   M2_t = sum (x - m_t)^2          (per (b, g), computed in float32)

and two partial results merge exactly (Chan, Golub & LeVeque 1979,
https://doi.org/10.1007/978-3-642-51461-6_3) in float64:

    n = n_a + n_b,   d = m_b - m_a,   m = m_a + d n_b / n,
    M2 = M2_a + M2_b + d^2 n_a n_b / n,

so the merged variance M2 / n is that of the concatenated values. The last term (the spread of
the tile means) is the one a sum of per-tile variances drops: without it a map whose tiles differ
in mean, which is every real image, comes out with too small a variance and too bright a tone.
Only a tile's own rows count, never its halo, so each value counts once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import reduce

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class GroupStats:
    """Count, mean and M2 = sum (x - mean)^2 per (sample, group); mean, m2: (B, G) float64."""

    count: float
    mean: Tensor
    m2: Tensor

    @property
    def groups(self) -> int:
        return self.mean.shape[1]

    @classmethod
    def of(cls, x: Tensor, groups: int) -> GroupStats:
        """Statistics of a tile x: (B, C, h, w), its C channels split into `groups` groups."""
        flat = x.reshape(x.shape[0], groups, -1).float()
        var, mean = torch.var_mean(flat, dim=-1, correction=0)
        n = flat.shape[-1]
        return cls(float(n), mean.double(), var.double() * n)

    def merge(self, other: GroupStats) -> GroupStats:
        """The statistics of both tiles' values together (Chan's formula, module docstring)."""
        n = self.count + other.count
        delta = other.mean.to(self.mean.device) - self.mean
        mean = self.mean + delta * (other.count / n)
        between = delta.square() * (self.count * other.count / n)
        return GroupStats(n, mean, self.m2 + other.m2.to(self.m2.device) + between)

    def variance(self) -> Tensor:
        """The biased variance M2 / n that GroupNorm divides by: (B, G) float64."""
        return self.m2 / self.count


def merge_all(parts: Iterable[GroupStats]) -> GroupStats:
    """Merge the statistics of any number of tiles (in any order)."""
    return reduce(GroupStats.merge, parts)


class StatsAccumulator:
    """Collects the GroupStats of the tiles of one map as they are written; groups=None: off."""

    def __init__(self, groups: int | None) -> None:
        self.groups = groups
        self._total: GroupStats | None = None

    def add(self, tile: Tensor) -> None:
        if self.groups is None:
            return
        stats = GroupStats.of(tile, self.groups)
        self._total = stats if self._total is None else self._total.merge(stats)

    def result(self) -> GroupStats | None:
        return self._total


def group_norm_tile(x: Tensor, stats: GroupStats, norm: nn.GroupNorm) -> Tensor:
    """Apply `norm` to a tile x: (B, C, h, w) with the whole map's statistics.

    y = (x - mean_g) * rstd_g * gamma_c + beta_c,  rstd_g = 1 / sqrt(var_g + eps), for c in g;
    computed in float32 (as PyTorch's GroupNorm does for half inputs), returned in x's dtype.
    """
    if stats.groups != norm.num_groups:
        raise ValueError(f"statistics were gathered for {stats.groups} groups but the GroupNorm "
                         f"has {norm.num_groups}")
    per_group = x.shape[1] // norm.num_groups
    mean = stats.mean.repeat_interleave(per_group, dim=1)  # (B, C)
    scale = (stats.variance() + norm.eps).rsqrt().repeat_interleave(per_group, dim=1)
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    y = x.float() - mean.to(device=x.device, dtype=torch.float32)[..., None, None]
    y.mul_(scale.to(y)[..., None, None])  # in place: one tile-sized buffer, not three
    if norm.bias is not None:
        y.add_(norm.bias.to(y)[:, None, None])
    return y.to(x.dtype)
