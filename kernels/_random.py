"""Counter-based Gaussian noise shared by the reparameterization kernels.

Element f (flat, row-major index into the sample) takes its eps from Philox-4x32-10 with
  key     = seed (64 bit)
  counter = (lo32(f // 4), hi32(f // 4), lo32(offset), hi32(offset))
and output lane f % 4, turned into normals by Box-Muller on lanes (0, 1) and (2, 3).
The mapping is independent of block sizes and of the kernel, so `reparameterize` and
`reparameterize_kl` give the same z for the same seed, and backward kernels regenerate the
forward's eps exactly instead of storing it. Counters are 64 bit: no size limit.
"""

from __future__ import annotations

from typing import Any

from kernels._common import jit

tl: Any = None  # bound to triton.language on first launch (kernels._common.LazyJit)


@jit
def _philox_normal4(seed, offset, quad):
    """Four (quad.shape) fp32 normals from one Philox call per counter `quad` (int64)."""
    c0 = quad.to(tl.uint32)  # truncation keeps the low 32 bits
    c1 = (quad >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + offset.to(tl.uint32)
    c3 = tl.zeros_like(c0) + (offset >> 32).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
    return n0, n1, n2, n3


@jit
def _normal_block(seed_ptr, start, BLOCK: tl.constexpr):
    """eps for the flat indices start + [0, BLOCK) as a (BLOCK,) fp32 block; start % 4 == 0.

    One Philox call per 4 elements: the 4 lanes are interleaved back into flat order.
    """
    seed = tl.load(seed_ptr)  # int64 Philox key
    offset = tl.load(seed_ptr + 1)  # int64 stream offset
    quad = start // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)  # (BLOCK/4,)
    n0, n1, n2, n3 = _philox_normal4(seed, offset, quad)
    lanes = tl.join(tl.join(n0, n2), tl.join(n1, n3))  # (BLOCK/4, 2, 2) = n0, n1, n2, n3
    return tl.reshape(lanes, (BLOCK,))


@jit
def _normal_at(seed_ptr, f):
    """eps for arbitrary int64 flat indices f (any shape); one Philox call per element."""
    seed = tl.load(seed_ptr)
    offset = tl.load(seed_ptr + 1)
    n0, n1, n2, n3 = _philox_normal4(seed, offset, f // 4)
    lane = f % 4
    return tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))
