"""Types the runtime and its backends share: the artifact's contract and the errors."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from math import isfinite
from typing import Any, NoReturn

import numpy as np
import torch
from torch import Tensor

_add_reduce, _float64 = np.add.reduce, np.float64  # bound once: the check runs per call


class SamplerError(RuntimeError):
    """An artifact that cannot be loaded or run: corrupt, mismatched, or backend missing."""


class InputError(ValueError, TypeError):
    """A bad argument to the runtime (shape, dtype, device, count, seed, labels, memory): the
    message says what was expected and how to fix it. A ValueError and a TypeError, so callers
    that catch either keep working."""


@dataclass(frozen=True)
class ModelSpec:
    """What a decoder artifact takes and gives, read from the artifact's own metadata."""

    family: str
    latent_kind: str  # "gaussian": z ~ N(0, I); "codes": integer codes, uniform in [0, num_codes)
    latent_shape: tuple[int, ...]
    latent_dtype: torch.dtype
    output_shape: tuple[int, ...]
    conditional: bool
    num_classes: int
    num_codes: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    config: dict[str, Any]
    # Latent-diffusion VAEs: latents (C, h, w) and images (3, f h, f w) for any h, w >= 1, with
    # f = spatial_factor (latent_shape/output_shape hold an example); 0: shapes are fixed.
    spatial_factor: int = 0
    has_prior: bool = True  # False: no N(0, I) prior to sample (latent-diffusion VAEs)
    scaling_factor: float = 1.0  # diffusion latents = (z - shift_factor) * scaling_factor
    shift_factor: float = 0.0

    @property
    def extra_inputs(self) -> tuple[str, ...]:
        """Decoder inputs besides the latent and the labels (e.g. a crystal's atom mask)."""
        return self.input_names[1 + self.conditional:]

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str) -> ModelSpec:
        """From the string map of export.manifest.artifact_metadata() (ONNX / .pt2 / sidecar)."""
        if "latent_shape" not in meta:
            raise SamplerError(f"{where} carries no vae-engine metadata (latent_shape, ...);"
                               " re-export it with python -m export.onnx / export.aoti")
        ints = lambda s: tuple(int(v) for v in s.split(",") if v)
        names = lambda s: tuple(v for v in s.split(",") if v)
        return cls(meta.get("family", ""), meta.get("latent_kind", "gaussian"),
                   ints(meta["latent_shape"]), getattr(torch, meta.get("latent_dtype", "float32")),
                   ints(meta["output_shape"]), meta.get("conditional") == "1",
                   int(meta.get("num_classes", 0)), int(meta.get("num_codes", 0)),
                   names(meta["input_names"]), names(meta.get("output_names", "images")),
                   json.loads(meta.get("model_config", "{}")),
                   int(meta.get("spatial_factor", 0)), meta.get("prior", "1") != "0",
                   float(meta.get("scaling_factor", 1.0)), float(meta.get("shift_factor", 0.0)))


@dataclass(frozen=True)
class RuntimeInfo:
    backend: str
    device: str
    precision: str
    min_batch: int
    max_batch: int | None  # None: no upper bound
    latent_kind: str
    latent_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    conditional: bool
    num_classes: int
    artifact: str
    cuda_graphs: bool = False  # runs replay captured CUDA graphs (ORT CUDA EP, compile on CUDA)
    graph_rewrites: tuple[str, ...] = ()  # nodes the backend rewrote at load (ORT CPU)


SMALL = 256  # arrays up to this size are summed in Python: the batch-1 hot path


def finite_sum(a: Any) -> float:
    """Sum of a float32/float64 array in float64: finite iff every element is (short of
    overflow past 1e308). Small arrays go through tolist() and Python's sum, which costs about
    1 us after an ONNX Runtime call where numpy's reduction costs about 3 (cold code paths);
    larger ones through numpy's vectorized reduction."""
    if a.size <= SMALL:
        return sum(a.ravel().tolist())
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: the caller reports it
        return _add_reduce(a, None, _float64)


def require_finite(t: Tensor, what: str, total: Any = None) -> None:
    """Raise a one-line InputError naming the rows of a CPU tensor `t` (B, ...) that hold a NaN
    or inf. Fast path: the sum of a float array is finite iff every element is, short of
    overflow (then the exact check below decides); pass `total` if it is already computed."""
    if not t.is_floating_point():
        return
    if total is None and t.dtype in (torch.float32, torch.float64):
        total = finite_sum(t.detach().numpy())  # ~1 us at batch 1, vs ~8 us for isfinite
    if total is not None and math.isfinite(total):
        return
    bad = (~torch.isfinite(t.detach())).flatten(1).any(1).nonzero().flatten().tolist()
    if bad:
        raise InputError(f"{what} holds NaN or inf in {len(bad)} of {t.shape[0]} rows (first:"
                         f" row {bad[0]}); fix or drop those rows before calling")


_ONES: dict[tuple[int, str], Any] = {}  # (size, dtype char) -> ones, for outputs_finite
ONES_UP_TO = 1 << 16  # outputs up to this size use the cached dot product below


def outputs_finite(a: Any) -> bool:
    """Whether a numpy output holds no NaN or inf. Small outputs: the dot product with a cached
    ones vector (~1 us at 784 float32 pixels, the batch-1 hot path; np.add.reduce costs ~2 and
    np.errstate another ~1) is finite when every element is, short of overflow of a sum past
    the dtype's range (then numpy warns and the exact elementwise check below decides, which is
    also the path of every larger output)."""
    r = a.reshape(-1)
    if r.size <= ONES_UP_TO:
        ones = _ONES.get((r.size, r.dtype.char))
        if ones is None:
            ones = _ONES[r.size, r.dtype.char] = np.ones(r.size, r.dtype)
        if isfinite(r.dot(ones)):
            return True
    return bool(np.isfinite(r).all())


def require_finite_outputs(z: Tensor, outs: Sequence[Tensor], what: str, symbol: str = "z"
                           ) -> None:
    """Raise an InputError naming the rows of CPU outputs `outs` (each (B, ...)) that hold NaN or
    inf although their (finite, already checked) latent rows `z` (B, ...) did not: latents far
    outside the prior overflow the decoder's float32 arithmetic. Exact, unlike a bound on |z|."""
    n = z.shape[0]
    bad = torch.zeros(n, dtype=torch.bool)
    for o in outs:
        if o.is_floating_point() and o.shape[:1] == z.shape[:1]:
            bad |= ~torch.isfinite(o.detach()).reshape(n, -1).all(1)
    rows = bad.nonzero().flatten().tolist()
    if not rows:
        return
    zmax = z.detach()[rows].reshape(len(rows), -1).abs().amax(1).tolist()
    shown = ", ".join(f"row {r} (max |{symbol}| {m:.3g})" for r, m in zip(rows[:4], zmax[:4]))
    raise InputError(f"{what}: the outputs of {len(rows)} of {n} rows are NaN or inf although"
                     f" their inputs are finite: {shown}{', ...' if len(rows) > 4 else ''};"
                     " inputs this large overflow the model's arithmetic (N(0, I) latents lie"
                     " within |z| < 10): clip or rescale those rows")


def device_outputs_finite(outs: Sequence[Tensor]) -> bool:
    """Whether GPU outputs hold no NaN or inf, at one device sync for all of them: each output's
    float64 sum is finite iff every element is (a float32 element is below 3.5e38, so no count
    of them overflows float64's 1.8e308), and the sums travel to the host in one copy. Float64
    outputs, whose sum can overflow, are checked elementwise (log(1) = 0, log(0) = -inf)."""
    sums = [o.sum(dtype=torch.float64) if o.dtype is not torch.float64
            else torch.isfinite(o).all().double().log() for o in outs if o.is_floating_point()]
    return not sums or isfinite((sums[0] if len(sums) == 1 else torch.stack(sums).sum()).item())


def refuse_nonfinite_rows(x: Tensor, outs: Sequence[Tensor], what: str, symbol: str = "z"
                          ) -> NoReturn:
    """After device_outputs_finite() said no: name the input rows `x` (B, ...) that hold NaN or
    inf, else the rows whose outputs are not finite (require_finite_outputs). Copies to the
    host: the error path only."""
    x, outs = x.detach().cpu(), [o.detach().cpu() for o in outs]
    require_finite(x, f"{what}: the {'latent' if symbol == 'z' else 'images'}")
    require_finite_outputs(x, outs, what, symbol)
    raise InputError(f"{what}: an output without a row per input holds NaN or inf although"
                     " the inputs are finite: clip or rescale the inputs")


def checked_outputs(x: Tensor, outs: list[Tensor], what: str, check_gpu: bool = True,
                    symbol: str = "z") -> list[Tensor]:
    """`outs` of the inputs `x` (B, ...), both on the runtime's device, after refusing outputs
    that hold NaN or inf: on the CPU through numpy views (outputs_finite, then the rows named
    by require_finite_outputs); on a GPU, unless check_gpu is False, through one device sync
    (device_outputs_finite, then refuse_nonfinite_rows)."""
    if not x.is_cpu:
        if check_gpu and not device_outputs_finite(outs):
            refuse_nonfinite_rows(x, outs, what, symbol)
        return outs
    for o in outs:
        a = o.detach().numpy() if o.dtype in (torch.float32, torch.float64) else None
        if o.is_floating_point() and not (outputs_finite(a) if a is not None
                                          else bool(torch.isfinite(o).all())):
            require_finite_outputs(x, outs, what, symbol)
    return outs
