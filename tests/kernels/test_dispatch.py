"""kernels.dispatch: backend names, scoping, and where each backend sends a call."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import kernels
from kernels import dispatch, gn_silu, kl, reparam, reparam_kl, vq, vq_ema
from tests.kernels.conftest import DEVICE, randn


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[str]:
    calls: list[str] = []
    original = getattr(module, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_set_get_and_scoped_backend() -> None:
    with kernels.use_backend("torch"):
        assert kernels.get_backend() == "torch"
        with pytest.raises(RuntimeError, match="boom"), kernels.use_backend("auto"):
            assert kernels.get_backend() == "auto"
            raise RuntimeError("boom")
        assert kernels.get_backend() == "torch"  # restored after the exception
    previous = kernels.get_backend()
    kernels.set_backend("auto")
    try:
        assert kernels.get_backend() == "auto"
    finally:
        kernels.set_backend(previous)


def test_unknown_backend_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="auto, triton, torch"):
        kernels.set_backend("cuda")
    with pytest.raises(ValueError, match="auto, triton, torch"), kernels.use_backend("tl"):
        pass


def test_torch_backend_calls_every_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    spies = {
        "reparameterize_ref": _spy(monkeypatch, reparam, "reparameterize_ref"),
        "kl_divergence_ref": _spy(monkeypatch, kl, "kl_divergence_ref"),
        "reparameterize_kl_ref": _spy(monkeypatch, reparam_kl, "reparameterize_kl_ref"),
        "vq_nearest_ref": _spy(monkeypatch, vq, "vq_nearest_ref"),
        "vq_quantize_ref": _spy(monkeypatch, vq, "vq_quantize_ref"),
        "vq_ema_update_ref": _spy(monkeypatch, vq_ema, "vq_ema_update_ref"),
        "group_norm_silu_ref": _spy(monkeypatch, gn_silu, "group_norm_silu_ref"),
    }
    mu, logvar, x, codebook = randn(4, 3), randn(4, 3), randn(10, 3), randn(5, 3)
    with kernels.use_backend("torch"):
        kernels.reparameterize(mu, logvar, seed=1)
        kernels.kl_divergence(mu, logvar)
        kernels.reparameterize_kl(mu, logvar, seed=1)
        idx = kernels.vq_nearest(x, codebook)
        kernels.vq_quantize(x, codebook)
        kernels.vq_ema_update(x, idx, 5)
        kernels.group_norm_silu(randn(2, 4, 3, 3), 2)
    uncalled = [name for name, calls in spies.items() if not calls]
    assert uncalled == []  # vq_nearest_ref runs twice: vq_quantize_ref uses it


def test_triton_backend_does_not_call_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch, kl, "kl_divergence_ref")
    with kernels.use_backend("triton"):
        kernels.kl_divergence(randn(4, 3), randn(4, 3))
    assert calls == []


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU rules")
def test_triton_on_cpu_without_interpreter_explains(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with kernels.use_backend("triton"), pytest.raises(RuntimeError) as info:
        kernels.reparameterize(randn(2, 3), randn(2, 3))
    assert "TRITON_INTERPRET=1" in str(info.value) and "--kernels torch" in str(info.value)


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU rules")
def test_auto_on_cpu_follows_the_interpreter_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(2, 3)
    with kernels.use_backend("auto"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert dispatch.resolve(x) == "triton"
        monkeypatch.delenv("TRITON_INTERPRET")
        assert dispatch.resolve(x) == "torch"


def test_without_triton_auto_falls_back_and_triton_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "_HAS_TRITON", False)
    x = randn(2, 3)
    with kernels.use_backend("auto"):
        assert dispatch.resolve(x) == "torch"
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="not installed"):
        dispatch.resolve(x)


def test_vq_falls_back_above_max_d_under_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch, vq, "vq_nearest_ref")
    x, codebook = randn(3, vq.MAX_D + 1), randn(2, vq.MAX_D + 1)
    with kernels.use_backend("auto"):
        kernels.vq_nearest(x, codebook)
    assert calls == ["vq_nearest_ref"]
    with kernels.use_backend("triton"), pytest.raises(ValueError, match="D <= 1024"):
        kernels.vq_nearest(x, codebook)


_WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # import triton -> ImportError
import torch, kernels
mu, logvar = torch.randn(4, 3), torch.randn(4, 3)
z, kl = kernels.reparameterize_kl(mu, logvar, seed=1)
q, idx, loss = kernels.vq_quantize(torch.randn(8, 3), torch.randn(5, 3))
counts, sums = kernels.vq_ema_update(torch.randn(8, 3), idx, 5)
y = kernels.group_norm_silu(torch.randn(2, 4, 3, 3), 2, torch.randn(4), torch.randn(4))
assert y.shape == (2, 4, 3, 3)
assert kernels.reparameterize(mu, logvar).shape == (4, 3) and kl.shape == (4,)
try:
    with kernels.use_backend("triton"):
        kernels.kl_divergence(mu, logvar)
except RuntimeError as err:
    assert "not installed" in str(err)
else:
    raise AssertionError("triton backend without triton did not raise")
print("ok")
"""


def test_import_and_reference_work_without_triton() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU machine triton_op registration imports it")
def test_import_kernels_does_not_import_triton() -> None:
    code = "import sys, kernels; print('triton' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.stdout.strip() == "False", proc.stdout + proc.stderr
