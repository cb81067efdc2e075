"""Kernel backend dispatch: the one place that decides between Triton and the PyTorch reference.

Backends:
  "auto"    Triton for CUDA tensors; on the CPU the PyTorch reference, unless the environment
            variable TRITON_INTERPRET=1 is set (then the Triton interpreter runs the kernels).
  "triton"  always Triton; on the CPU this needs TRITON_INTERPRET=1, otherwise RuntimeError.
  "torch"   always the pure-PyTorch reference (`<op>_ref`).

The environment is read at call time, not at import time, so `import kernels` may happen before
a test harness sets TRITON_INTERPRET. Models never branch on the backend: they call the public
functions in `kernels`, which call `resolve()`.

    import kernels
    kernels.set_backend("torch")            # process-wide
    with kernels.use_backend("triton"):     # scoped, restores the previous choice on exit
        z = kernels.reparameterize(mu, logvar)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")

# Mutable holder instead of `global` rebinding; torch.compile guards on the value it reads.
_STATE: dict[str, str] = {"backend": "auto"}


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str) -> None:
    """Select the kernel backend for the whole process: "auto", "triton" or "torch"."""
    _STATE["backend"] = _validate(name)


def get_backend() -> str:
    """Return the selected backend name ("auto", "triton" or "torch"), not the resolved one."""
    return _STATE["backend"]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Select a backend inside a `with` block and restore the previous one on exit."""
    previous = _STATE["backend"]
    _STATE["backend"] = _validate(name)
    try:
        yield
    finally:
        _STATE["backend"] = previous


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (blocked)
        return False


# Looked up once (without importing triton), so torch.compile sees a constant.
_HAS_TRITON = _find_triton()


def has_triton() -> bool:
    """True when the `triton` package is installed."""
    return _HAS_TRITON


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET is set to a true value (read now, not at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve(x: torch.Tensor) -> str:
    """Return "triton" or "torch" for an op whose inputs live on `x.device`.

    Raises RuntimeError when "triton" is requested but cannot run here.
    """
    backend = _STATE["backend"]
    if backend == "torch":
        return "torch"
    runnable = has_triton() and (x.is_cuda or interpreter_enabled())
    if backend == "auto":
        return "triton" if runnable else "torch"
    if not has_triton():
        raise RuntimeError(
            "kernel backend 'triton' was selected but the triton package is not installed: "
            "install triton or select the reference with set_backend('torch') / --kernels torch"
        )
    if not runnable:
        raise RuntimeError(
            f"kernel backend 'triton' was selected for a tensor on {x.device}, which Triton can "
            "only run through its interpreter: set TRITON_INTERPRET=1, or use the PyTorch "
            "reference with set_backend('torch') / --kernels torch"
        )
    return "triton"
