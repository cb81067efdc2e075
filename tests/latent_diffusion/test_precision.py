"""Precision policy: force_upcast, and the fp32 rerun of rows that overflow in half precision."""

from __future__ import annotations

import warnings

import pytest
import torch

from engine.models import build_model, from_pretrained
from engine.models.latent_diffusion.precision import (
    compute_dtype,
    rerun_nonfinite_rows,
    upcast,
)

SMALL = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)


def test_compute_dtype_follows_diffusers_force_upcast():
    assert compute_dtype("fp16", force_upcast=True) is torch.float32
    assert compute_dtype(torch.float16, force_upcast=False) is torch.float16
    assert compute_dtype("bf16", force_upcast=True) is torch.bfloat16  # fp32's exponent range
    assert compute_dtype(None, force_upcast=True) is torch.float32
    with pytest.raises(ValueError, match="valid"):
        compute_dtype("fp8", force_upcast=False)


def test_from_pretrained_honours_force_upcast(build_kl, build_tiny, tmp_path):
    build_kl("sd-like").save_pretrained(tmp_path / "kl")  # force_upcast defaults to true
    build_tiny().save_pretrained(tmp_path / "tiny")  # force_upcast false
    assert from_pretrained(tmp_path / "kl", dtype="fp16").dtype is torch.float32
    assert from_pretrained(tmp_path / "kl", dtype="bf16").dtype is torch.bfloat16
    assert from_pretrained(tmp_path / "tiny", dtype="fp16").dtype is torch.float16


def test_rerun_touches_only_the_offending_rows():
    calls = []
    module = torch.nn.Linear(3, 3).half()

    def run(x):
        calls.append((x.shape[0], module.weight.dtype))
        out = x.clone()
        if module.weight.dtype is torch.float16:
            out[1] = torch.inf  # row 1 overflows in half precision only
        return (out,)

    x = torch.randn(4, 3).half()
    (out,), redone = rerun_nonfinite_rows(run, module, x)
    assert redone == 1 and calls == [(4, torch.float16), (1, torch.float32)]
    assert module.weight.dtype is torch.float16 and torch.isfinite(out).all()
    assert torch.equal(out[1], x[1])


def test_upcast_restores_weights_bitwise():
    model = build_model("autoencoder-tiny", "taesd").to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with upcast(model):
        assert next(model.parameters()).dtype is torch.float32
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype is v.dtype for k, v in before.items())


def _planted_overflow_models(z: torch.Tensor) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(fp16 model, fp32 model with the same fp16-rounded weights) for latents z whose row 1 is
    ~1000x the others: conv_in is scaled so that row 1's first activation peaks at 8x the fp16
    maximum (65504) and overflows for certain, while the other rows peak ~1000x lower."""
    model = build_model("autoencoder-kl", "sd15", **SMALL).eval()
    with torch.no_grad():
        peak = model.decoder.conv_in(model.post_quant_conv(z[1:2])).abs().max()
        model.decoder.conv_in.weight.mul_(8 * torch.finfo(torch.float16).max / peak)
    half = model.half()
    reference = build_model("autoencoder-kl", "sd15", **SMALL).eval()
    reference.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    return half, reference


@torch.no_grad()
def test_planted_fp16_overflow_is_rerun_in_fp32_and_warned_once():
    z = torch.randn(3, 4, 4, 4)
    z[1] *= 1000.0
    half, reference = _planted_overflow_models(z)
    raw = half._decode_logits(z.half(), None)
    assert not torch.isfinite(raw[1]).all() and torch.isfinite(raw[[0, 2]]).all()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = half.decode(z)
        half.decode(z)  # second call: no second warning
    assert [str(w.message).count("rerun in float32") for w in caught] == [1]
    assert out.dtype is torch.float16 and torch.isfinite(out).all()
    expected = reference.decode(z)
    # fp16 output rounding: 2^-11 relative on values of order 1
    torch.testing.assert_close(out[1].float(), expected[1], atol=2e-3, rtol=0)
    torch.testing.assert_close(out[[0, 2]], raw[[0, 2]], atol=0, rtol=0)


@torch.no_grad()
def test_bf16_decode_error_is_small():
    """bf16 keeps 8 bits of mantissa: through ~20 layers the error stays at the percent level."""
    model = build_model("autoencoder-kl", "sd15", **SMALL).eval()
    z = torch.randn(2, 4, 6, 6)
    ref = model.decode(z)
    got = model.to(torch.bfloat16).decode(z).float()
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    assert 0 < err < 5e-2
