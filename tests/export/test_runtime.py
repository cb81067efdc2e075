"""engine.runtime.Sampler: backend selection by table, sampling semantics, honest errors."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from engine import runtime
from engine.runtime import BACKENDS, Sampler, SamplerError, resolve
from engine.runtime.backends import OnnxRuntimeBackend


# --- selection -------------------------------------------------------------------------------
def test_backend_follows_the_artifact(aoti_exported):
    export_dir = aoti_exported("mlp")
    assert resolve(export_dir / "decoder.onnx", None, None) == ("onnxruntime",
                                                               export_dir / "decoder.onnx")
    assert resolve(export_dir / "decoder.pt2", None, None)[0] == "aoti"
    assert resolve(export_dir.parent, None, None)[0] == "eager"
    assert resolve(export_dir.parent / "last", None, None)[0] == "eager"
    # an export directory: its decoder, on the preferred installed backend for the device
    assert resolve(export_dir, None, "cpu") == ("onnxruntime", export_dir / "decoder.onnx")
    assert resolve(export_dir, "aoti", "cpu") == ("aoti", export_dir / "decoder.pt2")
    assert runtime.PREFERENCE["cpu"][0] == "onnxruntime"


def test_export_dir_skips_backends_that_are_not_installed(aoti_exported, monkeypatch):
    export_dir = aoti_exported("mlp")
    monkeypatch.setattr(BACKENDS["onnxruntime"], "installed", classmethod(lambda cls: False))
    assert resolve(export_dir, None, "cpu") == ("aoti", export_dir / "decoder.pt2")


def test_info_describes_the_engine(onnx_exported):
    info = Sampler.load(onnx_exported("cvae-conv")).info
    assert (info.backend, info.device, info.precision) == ("onnxruntime", "cpu", "fp32")
    assert (info.min_batch, info.max_batch) == (1, None)
    assert info.latent_shape == (8,) and info.output_shape == (1, 28, 28)
    assert info.conditional and info.num_classes == 10


def test_eager_and_onnx_samples_match_for_a_seed(onnx_exported):
    export_dir = onnx_exported("mlp")
    eager, ort = Sampler.load(export_dir.parent), Sampler.load(export_dir)
    a = eager.sample(9, seed=3)
    b = ort.sample(9, seed=3)
    assert a.shape == (9, 1, 28, 28)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_seed_gives_the_same_images_whatever_the_batch_size(onnx_exported):
    s = Sampler.load(onnx_exported("cvae-mlp"))
    a = s.sample(10, seed=7, labels=4)
    b = s.sample(10, seed=7, labels=4, batch_size=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, s.sample(10, seed=8, labels=4))


def test_vq_samples_are_codes_decoded(onnx_exported):
    s = Sampler.load(onnx_exported("vqvae"))
    codes = s.latents(5, seed=0)
    assert codes.dtype == torch.int64 and int(codes.max()) < s.spec.num_codes
    assert s.sample(5, seed=0).shape == (5, 1, 28, 28)


def test_batches_outside_the_profile_are_split_or_padded(onnx_exported):
    path = onnx_exported("mlp") / "decoder.onnx"
    z = Sampler.load(path).latents(20, seed=1)
    full = Sampler.load(path).decode(z)
    backend = OnnxRuntimeBackend(path)
    backend.batch_range = (4, 8)  # as a TensorRT profile would be
    seen = []
    run = backend.run
    backend.run = lambda inputs: seen.append(inputs[0].shape[0]) or run(inputs)
    s = Sampler(backend, path)
    torch.testing.assert_close(s.decode(z), full)
    assert seen == [8, 8, 4]
    torch.testing.assert_close(s.decode(z[:2]), full[:2])  # padded up to the minimum
    assert seen[-1] == 4
    with pytest.raises(ValueError, match=r"batch_size 16 is outside the engine's profile \[4, 8\]"):
        s.sample(20, batch_size=16)


# --- input errors ------------------------------------------------------------------------------
def test_wrong_latent_shape(onnx_exported):
    s = Sampler.load(onnx_exported("mlp"))
    with pytest.raises(ValueError, match=r"expected a latent of shape \(B, 8\) float32, got"
                                         r" \(4, 16\).*\(mu, logvar\)"):
        s.decode(torch.zeros(4, 16))
    with pytest.raises(ValueError, match=r"got \(8,\)"):
        s.decode(torch.zeros(8))


def test_wrong_latent_dtype(onnx_exported):
    s = Sampler.load(onnx_exported("mlp"))
    with pytest.raises(ValueError, match=r"got \(4, 8\) float64: convert it"):
        s.decode(torch.zeros(4, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        s.decode([[0.0] * 8])


def test_labels_missing_or_unexpected(onnx_exported):
    cond = Sampler.load(onnx_exported("cvae-mlp"))
    with pytest.raises(ValueError, match=r"needs labels: .* shape \(3,\) with values in \[0, 10\)"):
        cond.decode(torch.zeros(3, 8))
    with pytest.raises(ValueError, match="needs labels"):
        cond.sample(3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        cond.decode(torch.zeros(3, 8), torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match=r"integer labels of shape \(3,\)"):
        cond.decode(torch.zeros(3, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="unconditional"):
        Sampler.load(onnx_exported("mlp")).decode(torch.zeros(3, 8), torch.zeros(3).long())


@pytest.mark.parametrize("batch", [1, 5])
def test_unexpected_extra_inputs_are_refused(onnx_exported, batch):
    s = Sampler.load(onnx_exported("mlp"))
    with pytest.raises(ValueError, match=r"takes inputs \['z'\]: missing \[\],"
                                         r" unexpected \['mask'\]"):
        s.decode(torch.randn(batch, 8), mask=torch.ones(batch, 4))


def test_wrong_image_shape_for_encode(onnx_exported):
    with pytest.raises(ValueError, match=r"encode\(\): expected images of shape \(B, 1, 28, 28\)"):
        Sampler.load(onnx_exported("mlp")).encode(torch.zeros(2, 3, 28, 28))


@pytest.mark.parametrize("artifact", ["decoder.onnx", "decoder.pt2", "checkpoint"])
@pytest.mark.parametrize("batch", [1, 7])
def test_non_finite_latents_are_refused(onnx_exported, aoti_exported, artifact, batch):
    export_dir = aoti_exported("mlp") if artifact == "decoder.pt2" else onnx_exported("mlp")
    s = Sampler.load(export_dir.parent if artifact == "checkpoint" else export_dir / artifact)
    z = torch.randn(batch, 8)
    row = int(torch.randint(batch, ()))
    z[row, int(torch.randint(8, ()))] = float(["nan", "inf", "-inf"][int(torch.randint(3, ()))])
    with pytest.raises(ValueError, match=rf"latent holds NaN or inf in 1 of {batch} rows"
                                         rf" \(first: row {row}\)"):
        s.decode(z)
    huge = torch.full((batch, 8), 3e38)  # finite, though its float32 sum overflows: never
    try:  # refused as NaN/inf input; only for the NaN/inf outputs it may give (issue 16)
        assert s.decode(huge).shape == (batch, 1, 28, 28)
    except ValueError as e:
        assert "although their inputs are finite" in str(e)


@pytest.mark.parametrize("size", [1, 20, 256, 257, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_sum_is_finite_exactly_when_every_element_is(size, dtype):
    from engine.runtime.types import finite_sum

    a = torch.randn(size, dtype=dtype)
    assert finite_sum(a.numpy()) == pytest.approx(float(a.double().sum()), rel=1e-9, abs=1e-9)
    for bad in ("nan", "inf", "-inf"):
        b = a.clone()
        b[int(torch.randint(size, ()))] = float(bad)
        assert not math.isfinite(finite_sum(b.numpy()))
    if size > 1:  # inf and -inf together sum to NaN: still caught
        b = a.clone()
        b[0], b[-1] = float("inf"), float("-inf")
        assert not math.isfinite(finite_sum(b.numpy()))
    big = torch.full((size,), 3e38, dtype=dtype)  # float32-overflowing, float64-finite sum
    assert math.isfinite(finite_sum(big.numpy()))


def test_non_finite_images_are_refused_by_encode(onnx_exported):
    x = torch.rand(5, 1, 28, 28)
    x[3, 0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"encode\(\): the images holds NaN or inf in 1 of 5 rows"
                                         r" \(first: row 3\)"):
        Sampler.load(onnx_exported("mlp")).encode(x)


# --- artifact errors ---------------------------------------------------------------------------
def _truncated_copy(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def test_truncated_onnx(onnx_exported, tmp_path):
    bad = _truncated_copy(onnx_exported("mlp") / "decoder.onnx", tmp_path / "decoder.onnx")
    with pytest.raises(SamplerError, match="not a valid ONNX model .*re-export"):
        Sampler.load(bad)


def test_truncated_pt2(aoti_exported, tmp_path):
    bad = _truncated_copy(aoti_exported("mlp") / "decoder.pt2", tmp_path / "decoder.pt2")
    with pytest.raises(SamplerError, match="not an AOTInductor package"):
        Sampler.load(bad)


def test_modified_artifact_is_caught_by_the_manifest(onnx_exported, tmp_path):
    export_dir = shutil.copytree(onnx_exported("mlp"), tmp_path / "export")
    with open(export_dir / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(SamplerError, match="does not match its manifest entry"):
        Sampler.load(export_dir)


def test_corrupt_manifest(onnx_exported, tmp_path):
    export_dir = shutil.copytree(onnx_exported("mlp"), tmp_path / "export")
    (export_dir / "manifest.json").write_text('{"format": 1, "artifacts": {')
    with pytest.raises(SamplerError, match="manifest.json is not valid JSON"):
        Sampler.load(export_dir)


def test_engine_needs_a_valid_sidecar(tmp_path):
    engine = tmp_path / "decoder.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(SamplerError, match="sidecar decoder.engine.json is missing"):
        Sampler.load(engine)
    (tmp_path / "decoder.engine.json").write_text("{ truncated")
    with pytest.raises(SamplerError, match="not valid JSON"):
        Sampler.load(engine)


def test_backend_not_installed(onnx_exported, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    monkeypatch.setattr(BACKENDS["onnxruntime"], "installed", classmethod(lambda cls: False))
    with pytest.raises(SamplerError, match="backend 'onnxruntime' is not installed.*pip install"):
        Sampler.load(onnx_exported("mlp") / "decoder.onnx")


def test_unknown_or_mismatched_backend(onnx_exported, tmp_path):
    export_dir = onnx_exported("mlp")
    with pytest.raises(SamplerError, match="unknown backend 'tvm'; valid: onnxruntime"):
        Sampler.load(export_dir, backend="tvm")
    with pytest.raises(SamplerError, match="is a onnxruntime artifact, not one for backend 'aoti'"):
        Sampler.load(export_dir / "decoder.onnx", backend="aoti")
    with pytest.raises(SamplerError, match="no decoder artifact for backend"):
        Sampler.load(export_dir, backend="tensorrt", device="cuda")
    (tmp_path / "model.xyz").write_bytes(b"x")
    with pytest.raises(SamplerError, match="cannot tell what"):
        Sampler.load(tmp_path / "model.xyz")
    (tmp_path / "model.bin").write_bytes(b"x")  # a pickle: refused before anything reads it
    with pytest.raises(SamplerError, match="never unpickles"):
        Sampler.load(tmp_path / "model.bin")


def test_aoti_package_refuses_another_device(aoti_exported):
    with pytest.raises(SamplerError, match="compiled for cpu, not cuda"):
        Sampler.load(aoti_exported("mlp") / "decoder.pt2", device="cuda")


@pytest.mark.slow
def test_compiled_eager_backend(checkpoints):
    run = checkpoints("mlp")
    s = Sampler.load(run, compile=True, device="cpu")
    assert s.info.backend == "compile"
    torch.testing.assert_close(s.sample(4, seed=0), Sampler.load(run).sample(4, seed=0))
