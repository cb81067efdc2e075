"""Every op's declared schema is also the one torch infers from its implementation's type hints.

torch 2.14's `triton_op` takes the `schema=` it is given; torch 2.11's (the lent GPU machines')
infers the schema from the annotations instead, so an annotation it cannot read (such as
`tuple[Tensor, ...]`) broke `import kernels` there (found on an H200, issue 16)."""

from __future__ import annotations

import importlib
import pkgutil
import re

import pytest
from torch._library.infer_schema import infer_schema

import kernels
from kernels._common import OpPair


def _ops() -> list[OpPair]:
    mods = [importlib.import_module(f"kernels.{m.name}") for m in pkgutil.iter_modules(
        kernels.__path__)]
    return [v for mod in mods for v in vars(mod).values() if isinstance(v, OpPair)]


def _normal(schema: str) -> str:
    """int and SymInt are one type to the dispatcher's schema parser here."""
    return re.sub(r"\bSymInt\b", "int", " ".join(schema.split()))


@pytest.mark.parametrize("op", _ops(), ids=lambda op: op.name)
def test_the_declared_schema_is_the_inferred_one(op):
    assert _normal(infer_schema(op.impl, mutates_args=())) == _normal(op.schema)


def test_every_kernel_module_registers_its_ops():
    names = {op.name for op in _ops()}
    assert {"vq_ema_update", "vq_quantize_fwd", "kl_divergence_fwd", "group_norm_silu_fwd"} <= names
