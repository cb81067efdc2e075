"""Property tests of Sampler.decode and Sampler.encode (issue 16): whatever tensor comes in,
the result is either exactly what the eager PyTorch decoder (encoder) gives (bit-exact on the
eager backend, within the ORT tolerance of tests/conftest.py on ONNX Runtime) or the engine's
own one-line InputError / SamplerError. Nothing else may escape: no torch or ONNX Runtime
exception, no NaN returned.

Inputs (hypothesis, fresh each run): shapes of rank 0-5 with dims 0-9 (half of them the right
latent / image shape with any batch, 0 included), dtypes float16/32/64, bfloat16, int32/64, bool,
complex64, layouts (contiguous, transposed, sliced with a step, expanded, channels_last),
NaN/inf/huge placements, labels of every kind for the conditional model; backends eager and
ONNX Runtime CPU on a tiny MLP VAE, a tiny conv VAE and a conditional MLP VAE.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine.checkpoint import load_model
from engine.runtime import InputError, Sampler, SamplerError
from export import onnx as onnx_export
from tests.conftest import assert_close_to_reference
from tests.export.conftest import make_checkpoint

FAMILIES = ("mlp", "conv", "cvae-mlp")
BACKENDS = ("eager", "onnxruntime")
DTYPES = (torch.float32, torch.float16, torch.float64, torch.bfloat16, torch.int32, torch.int64,
          torch.bool, torch.complex64)
LAYOUTS = ("contiguous", "transposed", "stepped", "expanded", "channels_last")
SPECIALS = (None, float("nan"), float("inf"), -float("inf"), 1e30, 3e38)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(family, backend) -> Sampler, and (family, part) -> eager module (the reference)."""
    root = tmp_path_factory.mktemp("runtime-properties")
    out = {}
    for family in FAMILIES:
        run = make_checkpoint(root / family, family, seed=int(torch.randint(1000, ())))
        assert onnx_export.main([str(run), "--parity-batches", "1"]) == 0
        out[family, "eager"] = Sampler.load(run, backend="eager", device="cpu")
        out[family, "onnxruntime"] = Sampler.load(run / "export" / "decoder.onnx", device="cpu")
        model, _ = load_model(run, device="cpu")
        for part in ("decoder", "encoder"):
            out[family, part] = model.export_parts()[part].module.eval()
    return out


@st.composite
def tensors(draw, tail: tuple[int, ...]) -> torch.Tensor:
    """A latent-like tensor: the right shape or not, any dtype, any layout, special values."""
    if draw(st.booleans()):
        shape = (draw(st.integers(0, 9)), *tail)
    else:
        shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=5)))
    dtype = draw(st.one_of(st.just(torch.float32), st.sampled_from(DTYPES)))
    layout = draw(st.sampled_from(LAYOUTS))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    base = shape
    if layout == "transposed":
        base = shape[::-1]
    elif layout in ("stepped", "expanded") and shape:
        base = (shape[0] * 2 if layout == "stepped" else 1, *shape[1:])
    t = (torch.randn(base, generator=gen, dtype=torch.float64) * 2)
    t = (t > 0) if dtype is torch.bool else t.to(dtype)
    if layout == "transposed":
        t = t.permute(tuple(reversed(range(t.dim()))))
    elif layout == "stepped" and shape:
        t = t[::2]
    elif layout == "expanded" and shape:
        t = t.expand(shape)
    elif layout == "channels_last" and len(shape) == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    special = draw(st.one_of(st.none(), st.sampled_from(SPECIALS)))  # clean half the time
    if special is not None and t.numel() and (t.is_floating_point() or t.is_complex()):
        t = t.clone()  # an expanded view shares one element across rows; strides are kept
        t[np.unravel_index(draw(st.integers(0, t.numel() - 1)), t.shape)] = special
    return t


def labels_for(draw, batch: int):
    """None, an int (maybe out of range), a numpy/torch scalar, or a vector of any dtype."""
    kind = draw(st.sampled_from(["none", "int", "numpy", "vector", "vector"]))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(-2, 12))
    if kind == "numpy":
        return np.int64(draw(st.integers(-1, 11)))
    n = draw(st.sampled_from([batch, batch, batch + 1]))
    dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.float32, torch.bool]))
    return torch.tensor(draw(st.lists(st.integers(-1, 10), min_size=n, max_size=n))).to(dtype)


def _reference(module, x: torch.Tensor, labels) -> tuple[torch.Tensor, ...]:
    """The eager decoder (encoder) on the same input as float32 for a float input (encode()
    converts any float precision; decode() refuses any but float32), labels broadcast as the
    engine documents; its outputs as a tuple."""
    args = (x.float() if x.is_floating_point() else x,)
    if labels is not None:
        y = labels if isinstance(labels, torch.Tensor) and labels.dim() else \
            torch.full((x.shape[0],), int(labels), dtype=torch.int64)
        args += (y.long(),)
    with torch.no_grad():
        out = module(*args)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _eager_or_one_error(models, data, part: str) -> None:
    """Draw a model, a backend, an input for `part` and labels; run it through the Sampler and
    compare with the eager module, unless the engine refused it in one line."""
    family = data.draw(st.sampled_from(FAMILIES))
    backend = data.draw(st.sampled_from(BACKENDS))
    s = models[family, backend]
    shape = s.spec.latent_shape if part == "decoder" else s.spec.output_shape
    x = data.draw(tensors(shape))
    labels = labels_for(data.draw, x.shape[0] if x.dim() else 1) if s.spec.conditional else None
    run = s.decode if part == "decoder" else s.encode
    try:
        out = run(x, labels=labels)
    except (InputError, SamplerError) as e:
        assert str(e) and "\n" not in str(e), repr(e)
        event("refused")
        return
    event(f"{part} ran")
    outs = out if isinstance(out, tuple) else (out,)
    refs = _reference(models[family, part], x, labels)
    assert len(outs) == len(refs)
    for got, ref in zip(outs, refs):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert torch.isfinite(got).all(), "a non-finite output was returned without an error"
        if backend == "eager":
            assert torch.equal(got, ref)
        elif got.numel():
            assert_close_to_reference(got, ref.double())


PROPERTY = settings(max_examples=400, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@PROPERTY
@given(data=st.data())
def test_decode_is_eager_or_one_engine_error(models, data):
    _eager_or_one_error(models, data, "decoder")


@PROPERTY
@given(data=st.data())
def test_encode_is_eager_or_one_engine_error(models, data):
    _eager_or_one_error(models, data, "encoder")
