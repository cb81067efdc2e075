"""Precision policy of the latent-diffusion VAEs: which dtype runs, and the fp32 rerun of rows
that overflow in half precision.

Policy (diffusers' pipelines do the same):
  * `compute_dtype(requested, force_upcast)`: fp16 requested on a VAE whose config sets
    `force_upcast` (SD 1.x, SDXL, SD3, FLUX: their activations exceed fp16's 65504 at high
    resolution) runs in fp32 instead; bf16 keeps fp32's exponent range and runs as asked.
  * `rerun_nonfinite_rows`: after a half-precision pass, rows (batch items) whose output holds a
    NaN or inf are run again in fp32, alone, and written back; the caller warns once per model.
    A black or NaN image is never returned silently.

The fp32 rerun converts the module's parameters to fp32 for the duration of the rerun and back
afterwards (`upcast`). Both conversions are exact (every fp16 and bf16 value is an fp32 value),
so the module is bit-identical afterwards, and the rerun equals an fp32 run of the same
half-precision weights. It is not thread-safe: one module must not run in two threads while a
rerun happens (the same holds for diffusers' `upcast_vae`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

HALF_DTYPES = (torch.float16, torch.bfloat16)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """torch.dtype from a dtype or one of DTYPES' names; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def compute_dtype(requested: torch.dtype | str | None, force_upcast: bool) -> torch.dtype:
    """The dtype a VAE runs in: fp32 by default; fp16 with `force_upcast` runs in fp32."""
    dtype = parse_dtype(requested) or torch.float32
    if dtype not in (torch.float32, *HALF_DTYPES):
        raise ValueError(f"a VAE runs in float32, float16 or bfloat16, not {dtype}")
    if dtype is torch.float16 and force_upcast:
        return torch.float32
    return dtype


def nonfinite_rows(outputs: tuple[Tensor, ...]) -> Tensor:
    """Indices (K,) of the batch rows where any output holds a NaN or inf."""
    bad = torch.zeros(outputs[0].shape[0], dtype=torch.bool, device=outputs[0].device)
    for out in outputs:
        bad |= ~torch.isfinite(out).flatten(1).all(1)
    return bad.nonzero().flatten()


@contextlib.contextmanager
def upcast(module: nn.Module) -> Iterator[None]:
    """Run `module` in fp32 inside the block; its floating parameters and buffers return to
    their dtypes afterwards (exactly: fp16/bf16 -> fp32 -> fp16/bf16 is lossless)."""
    dtypes = {name: t.dtype for name, t in _floating(module)}
    module.float()
    try:
        yield
    finally:
        for name, t in _floating(module):
            t.data = t.data.to(dtypes[name])


def _floating(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        if t.is_floating_point():
            yield name, t


def rerun_nonfinite_rows(run: Callable[[Tensor], tuple[Tensor, ...]], module: nn.Module,
                         x: Tensor) -> tuple[tuple[Tensor, ...], int]:
    """(outputs of run(x), number of rows rerun in fp32).

    `run` maps a batch (B, ...) to a tuple of outputs (B, ...), row by row independently (as a
    VAE's encoder and decoder do). When the outputs are in fp16/bf16 and some rows hold a NaN or
    inf, those rows alone are run again with `module` upcast to fp32 and written back (cast to
    the outputs' dtype)."""
    outputs = run(x)
    if outputs[0].dtype not in HALF_DTYPES:
        return outputs, 0
    rows = nonfinite_rows(outputs)
    if rows.numel() == 0:
        return outputs, 0
    with upcast(module):
        redone = run(x[rows].float())
    for out, new in zip(outputs, redone):
        out[rows] = new.to(out.dtype)
    return outputs, rows.numel()
