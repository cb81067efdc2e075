"""export.triton: the model repository's config.pbtxt parses with Triton's own schema
(tritonclient's model_config.proto through protobuf text_format) and matches the ONNX graph as
ONNX Runtime reads it (names, dtypes, ranks, dims); the model file is the exported one.

A Triton server cannot run here: that the repository loads in `tritonserver` is unverified.
The TensorRT path is checked with a stand-in plan file and sidecar (no TensorRT here).
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from export import triton

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] (dev extra) is missing")
text_format = pytest.importorskip("google.protobuf.text_format")
ort = pytest.importorskip("onnxruntime")

# ONNX Runtime's type strings -> Triton data types: an independent table to check against.
ORT_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64",
             "tensor(bool)": "TYPE_BOOL", "tensor(float16)": "TYPE_FP16"}


def parse(path) -> object:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _ort_dims(shape) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


def assert_matches_graph(config, onnx_path, max_batch: int) -> None:
    """Every graph input/output is in the config with its dtype and dims, in graph order."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for listed, actual in ((config.input, session.get_inputs()),
                           (config.output, session.get_outputs())):
        assert [t.name for t in listed] == [a.name for a in actual]
        for t, a in zip(listed, actual):
            dtype = model_config_pb2.DataType.Name(t.data_type)
            assert dtype == ORT_TYPES[a.type], (t.name, dtype, a.type)
            dims = _ort_dims(a.shape)
            if max_batch == 0:
                assert list(t.dims) == dims
                continue
            assert dims[0] == -1, f"{a.name}: no dynamic batch axis"
            if t.HasField("reshape"):  # a (B,) tensor: dims [1] reshaped to []
                assert list(t.dims) == [1] and list(t.reshape.shape) == dims[1:] == []
            else:
                assert list(t.dims) == dims[1:]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("family", ["mlp", "cvae-conv", "vqvae", "crystal"])
def test_config_parses_with_tritons_schema_and_matches_the_graph(onnx_exported, tmp_path,
                                                                  family):
    export_dir = onnx_exported(family)
    repo = tmp_path / "repo"
    argv = [str(export_dir), "--out", str(repo), "--max-batch", "32", "--instances", "2",
            "--kind", "cpu", "--preferred-batch", "16,8", "--max-queue-delay-us", "250"]
    assert triton.main(argv) == 0
    name = triton.default_name(export_dir / "decoder.onnx", "decoder")
    assert sorted(p.name for p in repo.iterdir()) == [name]  # no temp dirs left behind
    config = parse(repo / name / "config.pbtxt")
    assert (config.name, config.platform, config.max_batch_size) == (name, "onnxruntime_onnx", 32)
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    group = config.instance_group[0]
    assert (group.count, model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind)) == \
        (2, "KIND_CPU")
    model = repo / name / "1" / "model.onnx"
    assert _sha(model) == _sha(export_dir / "decoder.onnx")
    assert_matches_graph(config, model, 32)


def test_labels_get_a_reshape_and_the_crystal_keeps_its_dynamic_atoms(onnx_exported, tmp_path):
    repo = tmp_path / "repo"
    triton.export_triton(onnx_exported("cvae-conv"), repo, name="cvae")
    labels = [t for t in parse(repo / "cvae" / "config.pbtxt").input if t.name == "y"]
    assert len(labels) == 1 and list(labels[0].dims) == [1] and labels[0].HasField("reshape")
    triton.export_triton(onnx_exported("crystal"), repo, name="crystal")
    config = parse(repo / "crystal" / "config.pbtxt")
    z = next(t for t in config.input if t.name == "z")
    assert list(z.dims)[0] == -1  # the atom axis stays dynamic
    assert len(config.output) == 4


def test_no_batching_keeps_the_batch_axis_and_has_no_dynamic_batcher(onnx_exported, tmp_path):
    path = triton.export_triton(onnx_exported("mlp") / "decoder.onnx", tmp_path, name="m",
                                max_batch=0)
    config = parse(path / "config.pbtxt")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert_matches_graph(config, path / "1" / "model.onnx", 0)


def test_rewriting_replaces_the_model_dir(onnx_exported, tmp_path):
    export_dir = onnx_exported("mlp")
    triton.export_triton(export_dir, tmp_path, name="m", max_batch=8)
    (tmp_path / "m" / "stale.txt").write_text("old")
    triton.export_triton(export_dir, tmp_path, name="m", max_batch=16)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "config.pbtxt"]
    assert parse(tmp_path / "m" / "config.pbtxt").max_batch_size == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_tensorrt_plan_uses_the_onnx_it_was_built_from(onnx_exported, tmp_path):
    """A stand-in engine file and sidecar (TensorRT cannot run here): platform tensorrt_plan,
    model.plan is the engine's bytes, I/O from the ONNX beside it, batch range enforced."""
    work = tmp_path / "mlp" / "export"
    shutil.copytree(onnx_exported("mlp"), work)
    engine = work / "decoder.engine"
    engine.write_bytes(np.random.default_rng().bytes(64))
    sidecar = {"format": 1, "tensorrt": "10.0", "compute_capability": "9.0", "gpu": "H100",
               "precision": "fp32", "metadata": {}, "engine_sha256": _sha(engine), "bytes": 64,
               "onnx": "decoder.onnx", "batch_range": [1, 64],
               "profiles": [{"z": {"min": [1, 8], "opt": [32, 8], "max": [64, 8]}}]}
    (work / "decoder.engine.json").write_text(json.dumps(sidecar))
    path = triton.export_triton(engine, tmp_path / "repo", max_batch=64)
    config = parse(path / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.name == "mlp_decoder"
    assert _sha(path / "1" / "model.plan") == _sha(engine)
    assert_matches_graph(config, work / "decoder.onnx", 64)
    with pytest.raises(triton.TritonExportError, match=r"built for batches \[1, 64\]"):
        triton.export_triton(engine, tmp_path / "repo", max_batch=128)


def test_bad_settings_are_one_line_errors(onnx_exported, tmp_path, capsys):
    export_dir = onnx_exported("mlp")
    cases = [(["--max-batch", "8", "--preferred-batch", "16"], "each size must lie in [1"),
             (["--preferred-batch", "a"], "invalid literal"),
             (["--kind", "tpu"], "--kind in"),
             (["--name", "bad name"], "letters, digits")]
    for flags, words in cases:
        assert triton.main([str(export_dir), "--out", str(tmp_path), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err, (flags, err)
    assert triton.main([str(tmp_path / "none.onnx"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
