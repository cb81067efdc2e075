"""export.tensorrt: what runs without TensorRT (profiles, sidecars, missing TensorRT / GPU);
the build and run themselves are marked `tensorrt` and skipped where it is not installed."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from export import tensorrt as trt_export
from export.tensorrt import TensorRTError


def test_parse_profiles():
    assert trt_export.parse_profiles(None, 1, 64, 4096) == [(1, 64, 4096)]
    assert trt_export.parse_profiles("1:1:16,16:256:4096") == [(1, 1, 16), (16, 256, 4096)]
    for bad in ("1:8:4", "0:1:2", "1:2", "a:b:c"):
        with pytest.raises(ValueError, match="MIN:OPT:MAX"):
            trt_export.parse_profiles(bad)


def test_plan_profiles_varies_only_the_batch_axis():
    inputs = [("z", [-1, 20]), ("y", [-1])]
    plan = trt_export.plan_profiles(inputs, [(1, 1, 16), (16, 256, 4096)])
    assert plan[0]["z"] == {"min": [1, 20], "opt": [1, 20], "max": [16, 20]}
    assert plan[1]["y"] == {"min": [16], "opt": [256], "max": [4096]}
    assert trt_export.batch_range(plan) == (1, 4096)
    with pytest.raises(ValueError, match="dynamic non-batch axes"):
        trt_export.plan_profiles([("x", [-1, 3, -1, -1])], [(1, 1, 1)])


def _sidecar(**overrides):
    base = {"format": 1, "tensorrt": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3",
            "compute_capability": "9.0", "precision": "fp16", "bytes": 4, "engine_sha256": "x",
            "metadata": {"latent_shape": "20"},
            "profiles": [{"z": {"min": [1, 20], "opt": [64, 20], "max": [4096, 20]}}]}
    return {**base, **overrides}


def test_validate_sidecar_version_and_gpu():
    ok = _sidecar()
    assert trt_export.validate_sidecar(ok, "10.3.0", ok["gpu"], "9.0") == []
    with pytest.raises(TensorRTError, match=r"built with TensorRT 10.3.0, this is TensorRT"
                                            r" 10.5.0.*rebuild the engine"):
        trt_export.validate_sidecar(ok, "10.5.0", ok["gpu"], "9.0")
    with pytest.raises(TensorRTError, match=r"compute capability 9.0 \(NVIDIA H100 80GB HBM3\),"
                                            r" this GPU is 8.0 \(NVIDIA A100"):
        trt_export.validate_sidecar(ok, "10.3.0", "NVIDIA A100-SXM4-80GB", "8.0")
    warnings = trt_export.validate_sidecar(ok, "10.3.0", "NVIDIA H200", "9.0")
    assert "built on NVIDIA H100 80GB HBM3, running on NVIDIA H200" in warnings[0]


def test_read_sidecar_errors(tmp_path):
    engine = tmp_path / "m.engine"
    with pytest.raises(TensorRTError, match="sidecar m.engine.json is missing"):
        trt_export.read_sidecar(engine)
    (tmp_path / "m.engine.json").write_text('{"format": 1')
    with pytest.raises(TensorRTError, match="not valid JSON"):
        trt_export.read_sidecar(engine)
    (tmp_path / "m.engine.json").write_text(json.dumps({"format": 1, "tensorrt": "10.3.0"}))
    with pytest.raises(TensorRTError, match=r"missing \['compute_capability'"):
        trt_export.read_sidecar(engine)
    (tmp_path / "m.engine.json").write_text(json.dumps(_sidecar()))
    assert trt_export.read_sidecar(engine)["precision"] == "fp16"


def test_truncated_engine_is_caught_before_tensorrt(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"abc")  # sidecar says 4 bytes
    (tmp_path / "m.engine.json").write_text(json.dumps(_sidecar()))
    with pytest.raises(TensorRTError, match="does not match its sidecar.*truncated"):
        trt_export.TensorRTRunner(engine)


def test_missing_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTError, match="TensorRT is not installed: pip install tensorrt"):
        trt_export.import_tensorrt()


def test_old_tensorrt_and_missing_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(TensorRTError, match="TensorRT 8.6.1 found; .* install tensorrt 10"):
        trt_export.import_tensorrt()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TensorRTError, match="needs an NVIDIA GPU and none is visible"):
        trt_export.gpu_identity()


def test_cli_errors(onnx_exported, tmp_path, capsys, monkeypatch):
    onnx_path = onnx_exported("mlp") / "decoder.onnx"
    assert trt_export.main([str(onnx_path), "--profiles", "8:4:2"]) == 1
    assert "expected MIN:OPT:MAX" in capsys.readouterr().err
    assert trt_export.main([str(tmp_path / "none.onnx")]) == 1
    assert "does not exist; export it" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert trt_export.main([str(onnx_path), "--fp16"]) == 1
    assert "TensorRT is not installed" in capsys.readouterr().err


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_and_run_engine(onnx_exported, tmp_path, precision):
    from engine.runtime import Sampler

    export_dir = onnx_exported("cvae-conv")
    engine = trt_export.build_engine(export_dir / "decoder.onnx", tmp_path / "d.engine",
                                     precision, [(1, 8, 64)], 1.0, tmp_path / "tc.bin")
    sidecar = trt_export.read_sidecar(engine)
    assert sidecar["parity"]["passed"] and sidecar["batch_range"] == [1, 64]
    assert (tmp_path / "tc.bin").stat().st_size > 0
    s = Sampler.load(engine)
    assert s.info.backend == "tensorrt" and s.info.max_batch == 64
    ref = Sampler.load(export_dir / "decoder.onnx")
    z, y = ref.latents(100, seed=0), torch.randint(10, (100,))
    tol = {"fp32": 1e-4, "fp16": 2e-2}[precision]
    torch.testing.assert_close(s.decode(z, y).cpu(), ref.decode(z, y), atol=tol, rtol=0)
