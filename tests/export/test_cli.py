"""The command lines: export.onnx, export.aoti and engine.sample (exit codes, messages, files)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from engine import sample
from engine.models.export_wrappers import ExportPart
from export import common
from export import onnx as onnx_export
from export.aoti import main as aoti_main
from export.common import ExportError


# --- export.onnx -------------------------------------------------------------------------------
def test_onnx_default_out_dir_and_manifest(onnx_exported):
    export_dir = onnx_exported("conv")
    assert export_dir.name == "export" and (export_dir.parent / "last").is_dir()
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert sorted(manifest["artifacts"]) == ["decoder.onnx", "encoder.onnx"]
    assert manifest["model"]["latent"] == {"kind": "gaussian", "name": "z", "shape": [16],
                                           "dtype": "float32", "num_codes": 0,
                                           "dynamic_axes": {}}
    entry = manifest["artifacts"]["decoder.onnx"]
    assert entry["outputs"] == [{"name": "images", "shape": ["batch", 1, 28, 28],
                                 "dtype": "float32", "dynamic_axes": {"0": "batch"},
                                 "example_shape": [2, 1, 28, 28]}]
    assert entry["settings"]["nodes"] <= entry["settings"]["nodes_before_optimize"]


def test_onnx_fp16_parts_and_parity(checkpoints, tmp_path, capsys):
    out = tmp_path / "fp16"
    rc = onnx_export.main([str(checkpoints("mlp")), "--out", str(out), "--fp16",
                           "--parts", "decoder", "--parity-batches", "1,7"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "decoder.fp16.onnx parity vs PyTorch (fp16): batch 1: max_abs" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["artifacts"]) == ["decoder.fp16.onnx"]
    entry = manifest["artifacts"]["decoder.fp16.onnx"]
    assert entry["precision"] == "fp16" and entry["inputs"][0]["dtype"] == "float32"
    assert 0 < entry["parity"]["max_abs"] <= common.TOLERANCE["fp16"]
    from engine.runtime import Sampler

    assert Sampler.load(out).info.precision == "fp16"


def test_onnx_parity_failure_exits_nonzero(checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(common.TOLERANCE, "fp32", -1.0)  # nothing can pass
    rc = onnx_export.main([str(checkpoints("mlp")), "--out", str(tmp_path), "--parts",
                           "decoder", "--parity-batches", "1"])
    assert rc == 1
    assert "decoder.onnx: parity check failed: max_abs" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--parts", "decoder,prior"],
     "unknown part(s) ['prior']; this model exports: decoder, encoder"),
    (["--opset", "13"], "--opset 13: expected 18 (the dynamo exporter's lowest)"),
])
def test_onnx_bad_arguments(checkpoints, tmp_path, capsys, argv, message):
    assert onnx_export.main([str(checkpoints("mlp")), "--out", str(tmp_path), *argv]) == 1
    assert message in capsys.readouterr().err


def test_onnx_missing_checkpoint(tmp_path, capsys):
    assert onnx_export.main([str(tmp_path / "nothing")]) == 1
    assert "no checkpoint at" in capsys.readouterr().err


def test_random_ops_are_refused():
    class Noisy(torch.nn.Module):
        def forward(self, z):
            return z + torch.randn_like(z)

    part = ExportPart(Noisy(), (torch.zeros(2, 4),), ("z",), ("out",), {"z": {0: "batch"}})
    proto, _ = onnx_export.to_onnx(part, onnx_export.DEFAULT_OPSET, fp16=False)
    assert onnx_export.random_ops(proto) == ["RandomNormalLike"]
    with pytest.raises(ExportError, match=r"random ops \['RandomNormalLike'\]; keep the noise"):
        onnx_export.finish(proto, {}, "noisy.onnx")


# --- export.aoti (no compile needed for these) ---------------------------------------------------
def test_aoti_cuda_without_gpu(checkpoints, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert aoti_main([str(checkpoints("mlp")), "--device", "cuda"]) == 1
    assert "no CUDA device is visible; use --device cpu" in capsys.readouterr().err


def test_aoti_unknown_part(checkpoints, capsys):
    assert aoti_main([str(checkpoints("mlp")), "--parts", "prior"]) == 1
    assert "unknown part(s) ['prior']" in capsys.readouterr().err


# --- engine.sample -----------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", [[], ["random"]])
def test_sample_writes_a_grid(onnx_exported, tmp_path, prefix, capsys):
    out = tmp_path / "grid.png"
    rc = sample.main([*prefix, str(onnx_exported("mlp")), "--n", "6", "--out", str(out),
                      "--seed", "0", "--batch-size", "4"])
    assert rc == 0
    assert "wrote 6 samples" in capsys.readouterr().out
    with Image.open(out) as img:
        assert img.size[0] > 28 and img.size[1] > 28
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temp file left


def test_sample_from_a_checkpoint_with_labels(checkpoints, tmp_path):
    out = tmp_path / "c.png"
    assert sample.main([str(checkpoints("cvae-mlp")), "--n", "4", "--labels", "1,2",
                        "--out", str(out), "--backend", "eager"]) == 0
    assert out.stat().st_size > 0


def test_sample_errors_exit_2(onnx_exported, tmp_path, capsys):
    assert sample.main([str(onnx_exported("cvae-mlp")), "--out", str(tmp_path / "x.png")]) == 2
    assert "needs labels" in capsys.readouterr().err
    assert sample.main([str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.png")


def test_sample_without_arguments_prints_help(capsys):
    assert sample.main([]) == 2
    assert "random" in capsys.readouterr().out
