"""Exact tiled encode and decode for latent-diffusion autoencoders (AutoencoderKL, TAESD).

The schedule is layer by layer: each layer runs over the whole activation map one output tile
at a time, so tiles never see a different network than the untiled model does:

  geometry.py   which input window (tile + halo, zeros only at the true border) a tile reads
  groupnorm.py  GroupNorm statistics merged exactly across tiles (Chan's parallel formula)
  attention.py  the mid-block attention over the whole latent, one query tile at a time
  stages.py     one conv layer over a map, tile by tile (pre-norm, upsample, residual, post)
  memory.py     where the full maps live (device or parked on the host) and batch splits
  layers.py     the layer kinds and the walker; trees.py reads a module tree into layers
  api.py        tiled_decode, tiled_encode

The result equals the untiled model up to the order of float sums; docs/tiling.md has the
argument, the error measured against diffusers' blended tiling and the peak-memory ratio.
"""

from engine.models.tiling.api import tiled_decode, tiled_encode

__all__ = ["tiled_decode", "tiled_encode"]
