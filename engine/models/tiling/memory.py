"""Where the full activation maps live, and batch splits for upsamples past 2^31 elements.

The tiled schedule keeps at most three full maps of one layer alive (a resnet's input, its
inner map and its output; an attention's input, keys and values) and computes on one tile at a
time. The maps are *parked*: on the compute device when it has room, else in host memory (pinned
when the device is a GPU), and each tile's window is copied to the device, computed, and copied
back. Parked on the host, the device holds only the tile working set, so its peak is bounded by
the tile size, not the image size.

offload modes:
  "none"  every map stays on the compute device (fastest; needs about 3 maps of device memory)
  "host"  every map is parked in host memory (device memory bounded by the tile)
  "auto"  on CUDA, a map is parked on the host when it would take more than half of the free
          device memory at the time it is allocated; elsewhere, "none" (host = device)

PyTorch's nearest upsample fails on outputs of 2^31 elements or more, and with channels_last
returns zeros silently (diffusers #984, PyTorch #141831); `batch_slices` splits a batch so that
each slice's upsampled window stays below the limit. Splitting the batch is exact: every
statistic here is per sample.
"""

from __future__ import annotations

import torch
from torch import Tensor

OFFLOAD_MODES = ("auto", "none", "host")
UPSAMPLE_ELEMENT_LIMIT = 2**31 - 1  # the largest tensor F.interpolate(nearest) handles
AUTO_FREE_FRACTION = 0.5  # "auto" parks a map larger than this fraction of free device memory


def parks_on_host(mode: str, device: torch.device, nbytes: int,
                  free_bytes: int | None = None) -> bool:
    """Whether a full map of `nbytes` goes to host memory under offload `mode`.

    `free_bytes` (free device memory) is read from the CUDA driver when not given.
    """
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {mode!r}")
    if mode == "host":
        return True
    if mode == "none" or device.type != "cuda":
        return False
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    return nbytes > AUTO_FREE_FRACTION * free_bytes


def allocate_map(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 parked: bool) -> Tensor:
    """An uninitialized full map: on `device`, or parked in (pinned, for CUDA) host memory."""
    if not parked:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")


def batch_slices(batch: int, per_sample_elements: int) -> list[slice]:
    """Slices of the batch whose upsampled tensors stay within UPSAMPLE_ELEMENT_LIMIT.

    `per_sample_elements` is the element count of one sample's upsampled tensor.
    """
    limit = UPSAMPLE_ELEMENT_LIMIT
    if per_sample_elements > limit:
        raise ValueError(f"one sample's upsampled tile has {per_sample_elements} elements, over "
                         f"the {limit} that nearest upsampling handles: use a smaller tile_size")
    step = max(1, limit // max(per_sample_elements, 1))
    return [slice(i, min(i + step, batch)) for i in range(0, batch, step)]
