"""Per-group tiling shared by the GroupNorm + SiLU kernels (kernels/gn_silu.py and
gn_silu_bwd.py): the (N, C, HW) view of x and its strides, tile sizes, and how many
programs share a group.

x (N, C, *spatial) is read as (N, C, HW), HW = prod(spatial), with element strides
(stride_n, stride_c, stride_hw): (C * HW, HW, 1) when contiguous (NCHW), (HW * C, 1, C) when
channels are innermost (NHWC). A group's tile is BLOCK_C channels x BLOCK_HW pixels; Triton
specialises a stride of 1, so loads are coalesced along pixels (NCHW) or channels (NHWC).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from kernels._common import cdiv, jit, next_pow2

tl: Any = None  # bound to triton.language on first launch (kernels._common.LazyJit)

Optional = torch.Tensor | None
Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (y, mean, rstd) or (dx, dgamma, dbeta)


@jit
def offsets(base, c, hw, stride_c, stride_hw):
    """(BLOCK_C, BLOCK_HW) int64 element offsets of channels c and pixels hw of a group."""
    return base + c[:, None].to(tl.int64) * stride_c + hw[None, :].to(tl.int64) * stride_hw


@dataclass(frozen=True)
class Tuning:
    """Tile size and when to split a group over several programs (tests shrink both)."""

    tile: int = 4096  # elements per loop step (BLOCK_C x BLOCK_HW)
    programs_per_sm: int = 2  # split until N * G * S reaches this many programs per SM ...
    min_chunk: int = 16384  # ... keeping at least this many elements per program
    cpu_sms: int = 132  # SMs assumed off CUDA (the interpreter): an H100 / H200


TUNING = Tuning()


@dataclass(frozen=True)
class Launch:
    block_c: int  # channels per tile
    block_hw: int  # pixels per tile
    chunk: int  # pixels per program
    splits: int  # programs per group (grid axis 1)
    num_warps: int

    def blocks(self) -> dict[str, int]:
        return {"BLOCK_C": self.block_c, "BLOCK_HW": self.block_hw, "num_warps": self.num_warps}


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; TUNING.cpu_sms elsewhere."""
    if device.type != "cuda":
        return TUNING.cpu_sms
    return _cuda_sm_count(torch.cuda.current_device() if device.index is None else device.index)


def launch_params(groups: int, cpg: int, hw: int, device: torch.device) -> Launch:
    """Tiles of about `tile` elements (whole channel groups up to 64 channels); S chunks per
    group when N * G programs would leave SMs idle and each chunk keeps >= min_chunk elements."""
    t = TUNING
    block_c = min(64, next_pow2(cpg))
    block_hw = min(max(16, t.tile // block_c), max(16, next_pow2(hw)))
    wanted = cdiv(t.programs_per_sm * sm_count(device), groups)  # 1 once N * G fills the SMs
    min_hw = cdiv(cdiv(t.min_chunk, cpg), block_hw) * block_hw  # pixels per chunk, at least
    splits = max(1, min(wanted, hw // min_hw))
    chunk = cdiv(cdiv(hw, splits), block_hw) * block_hw  # whole tiles per chunk
    num_warps = 8 if block_c * block_hw >= 4096 else 4
    return Launch(block_c, block_hw, chunk, cdiv(hw, chunk), num_warps)


def channels_last(x: torch.Tensor) -> bool:
    """Channels innermost in memory (NHWC, NDHWC, NLC), dense."""
    return x.movedim(1, -1).is_contiguous()


def flat_view(x: torch.Tensor, groups: int) -> tuple[int, int, int, tuple[int, int, int]]:
    """(N * G, C / G, HW, (stride_n, stride_c, stride_hw)) of a contiguous or channels-last x."""
    n, c, hw = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    if not (x.is_contiguous() or channels_last(x)):
        raise ValueError(
            f"group_norm_silu kernels: expected a contiguous or channels-last x, got strides "
            f"{x.stride()} for shape {tuple(x.shape)}: call x.contiguous() first"
        )
    strides = (c * hw, hw, 1) if x.is_contiguous() else (hw * c, 1, c)
    return n * groups, c // groups, hw, strides


def like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t in x's memory layout (contiguous or channels-last), copied only if it differs."""
    if x.is_contiguous():
        return t.contiguous()
    return t if channels_last(t) else t.movedim(1, -1).contiguous().movedim(-1, 1)


def param(p: torch.Tensor | None, x: torch.Tensor, fill: float) -> torch.Tensor:
    return torch.full((x.shape[1],), fill, dtype=x.dtype, device=x.device) if p is None else p
