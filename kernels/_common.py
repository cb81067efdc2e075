"""Shared helpers for the kernel modules: lazy Triton JIT, op registration, input checks.

Why the JIT is lazy: `import triton` decides once, from TRITON_INTERPRET, whether every
`@triton.jit` function (triton's own `tl.sum`, `tl.philox`, ... included) is compiled or
interpreted. `import kernels` therefore never imports triton on a CPU machine; the first launch
does. A harness may set TRITON_INTERPRET=1 after `import kernels` but before the first launch.

Why two registrations: on a GPU `torch.library.triton_op` + `wrap_triton` lets Inductor see the
kernel; under TRITON_INTERPRET=1 that path fails inside torch.compile (wrap_triton hands back the
interpreted kernel, which cannot take FakeTensors), so each op is also registered with
`torch.library.custom_op` + `register_fake` as `vae_engine::<name>_interp`. `OpPair.pick()`
chooses at call time. The triton_op variant is registered only where CUDA and triton exist.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kernels.dispatch import has_triton, interpreter_enabled

NAMESPACE = "vae_engine"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# Lazy @triton.jit
# ----------------------------------------------------------------------------------------------
def _import_triton() -> Any:
    """Import triton, checking that its interpret mode matches TRITON_INTERPRET now."""
    if not has_triton():
        raise RuntimeError("the triton package is not installed: use set_backend('torch')")
    triton = importlib.import_module("triton")
    interpreted = type(triton.language.sum).__name__ == "InterpretedFunction"
    if interpreted != interpreter_enabled():
        raise RuntimeError(
            f"triton was imported with TRITON_INTERPRET={'1' if interpreted else 'unset'} but it "
            f"is {'1' if interpreter_enabled() else 'unset'} now: set TRITON_INTERPRET before "
            "anything imports triton (torch._dynamo does), e.g. `TRITON_INTERPRET=1 pytest ...`"
        )
    return triton


class LazyJit:
    """A `@triton.jit` function compiled (or interpreted) on first use.

    On first `get()` the defining module's globals `triton` and `tl` are bound to the real
    modules and every other `LazyJit` there (jit helpers) is replaced by its jitted function,
    which is what Triton's code generator and interpreter look up when a kernel runs.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._jitted: Any = None

    def get(self) -> Any:
        if self._jitted is None:
            triton = _import_triton()
            scope = self.fn.__globals__
            scope["triton"], scope["tl"] = triton, triton.language
            self._jitted = triton.jit(self.fn)
            for name, value in list(scope.items()):
                if isinstance(value, LazyJit):
                    scope[name] = value.get()
        return self._jitted


def jit(fn: Callable[..., Any]) -> LazyJit:
    """Decorator: `@jit` marks a Triton kernel or device helper, compiled on first launch."""
    return LazyJit(fn)


def jitted(kernel: LazyJit | Any) -> Any:
    """The jitted function (a module's `LazyJit` global is replaced by it after first use)."""
    return kernel.get() if isinstance(kernel, LazyJit) else kernel


def launch(kernel: LazyJit | Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """Launch `kernel[grid](*args, **kwargs)`, through `wrap_triton` unless interpreting."""
    fn = jitted(kernel)
    if not interpreter_enabled():
        fn = torch.library.wrap_triton(fn)
    fn[grid](*args, **kwargs)


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------
def _gpu_variant_wanted() -> bool:
    """Register triton_op variants where CUDA exists (or when tests force it to trace them)."""
    forced = os.environ.get("VAE_KERNELS_FORCE_TRITON_OP", "0") == "1"
    return has_triton() and (forced or torch.cuda.is_available())


class OpPair:
    """One op registered as `vae_engine::<name>` (triton_op) and `<name>_interp` (custom_op)."""

    def __init__(
        self, name: str, impl: Callable[..., Any], fake: Callable[..., Any], schema: str
    ) -> None:
        self.name, self.impl, self.schema = name, impl, schema
        self.interp = torch.library.custom_op(
            f"{NAMESPACE}::{name}_interp", impl, mutates_args=(), schema=schema
        )
        self.interp.register_fake(fake)
        self.gpu = None
        if _gpu_variant_wanted():
            self.gpu = torch.library.triton_op(
                f"{NAMESPACE}::{name}", impl, mutates_args=(), schema=schema
            )

    def variants(self) -> list[Any]:
        return [op for op in (self.interp, self.gpu) if op is not None]

    def pick(self) -> Any:
        """The variant that can run now: custom_op under the interpreter, else triton_op."""
        if self.gpu is None or interpreter_enabled():
            return self.interp
        return self.gpu

    def __call__(self, *args: Any) -> Any:
        return self.pick()(*args)

    def register_autograd(
        self, backward: Callable[..., Any], setup_context: Callable[..., Any]
    ) -> None:
        for op in self.variants():
            op.register_autograd(backward, setup_context=setup_context)


# ----------------------------------------------------------------------------------------------
# Input checks (ValueError / TypeError with what was expected and what was found)
# ----------------------------------------------------------------------------------------------
def check_float(op: str, name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}(): expected {name} to be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}(): expected {name} of dtype float16, bfloat16, float32 or float64, got {t.dtype}"
        )
    if t.dim() < 1:
        raise ValueError(f"{op}(): expected {name} with at least 1 dim (..., D), got a scalar")


def check_pair(op: str, a: torch.Tensor, b: torch.Tensor, names: Sequence[str]) -> None:
    """Both floating tensors of the same shape, dtype and device."""
    check_float(op, names[0], a)
    check_float(op, names[1], b)
    if a.shape != b.shape:
        raise ValueError(
            f"{op}(): expected {names[0]} and {names[1]} of the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.dtype != b.dtype:
        raise TypeError(
            f"{op}(): expected {names[0]} and {names[1]} of the same dtype, "
            f"got {a.dtype} and {b.dtype}: cast one of them"
        )
    if a.device != b.device:
        raise ValueError(
            f"{op}(): expected {names[0]} and {names[1]} on the same device, "
            f"got {a.device} and {b.device}"
        )


def seed_tensor(seed: int | torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """A (2,) int64 tensor [Philox seed, stream offset] on `device`.

    None draws both from torch's default generator of `device` (so `torch.manual_seed` makes runs
    reproducible, and under CUDA graphs the draw is replayed with fresh values instead of being
    baked into the graph). An int gives [seed, 0]. A (2,) int64 tensor is used as it is.
    """
    if seed is None:
        return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        if seed.shape != (2,) or seed.dtype != torch.int64:
            raise ValueError(
                "expected seed as an int or a (2,) int64 tensor [seed, offset], "
                f"got a tensor of shape {tuple(seed.shape)} and dtype {seed.dtype}"
            )
        return seed.to(device)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"expected seed as an int, a (2,) int64 tensor or None, got {seed!r}")
    return torch.tensor([seed, 0], dtype=torch.int64, device=device)
