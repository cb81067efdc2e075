"""Eager PyTorch vs ONNX Runtime vs AOTInductor, per model family, at batches 1, 7 and 256.

Tolerances come from export.common.TOLERANCE (fp32: 1e-4 of the output scale; the observed
errors are ~1e-7). Integer outputs (VQ codes) must agree except for rare argmin near-ties."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from engine.checkpoint import load_model
from engine.runtime import Sampler
from export.common import CODE_MISMATCH, TOLERANCE, compare
from export.onnx import DEFAULT_OPSET, random_ops

FAMILY_NAMES = ["mlp", "cvae-mlp", "conv", "cvae-conv", "vqvae"]
BATCHES = (1, 7, 256)


def assert_agree(ref, got, what: str, precision: str = "fp32") -> None:
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = got if isinstance(got, tuple) else (got,)
    s = compare(ref, got)
    bound = TOLERANCE[precision] * max(1.0, s["scale"])
    assert s["max_abs"] <= bound, f"{what}: max_abs {s['max_abs']:.3e} > {bound:.1e}"
    assert s["mismatch"] <= CODE_MISMATCH[precision], f"{what}: codes differ {s['mismatch']:.2%}"


def labels_for(sampler: Sampler, n: int):
    return torch.randint(sampler.spec.num_classes, (n,)) if sampler.spec.conditional else None


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_decoder_eager_onnxruntime_aoti_agree(family, aoti_exported):
    export_dir = aoti_exported(family)
    model, _ = load_model(export_dir.parent)
    view = model.export_parts()["decoder"].module.eval()
    ort = Sampler.load(export_dir / "decoder.onnx")
    aoti = Sampler.load(export_dir / "decoder.pt2")
    assert (ort.info.backend, aoti.info.backend) == ("onnxruntime", "aoti")
    for b in BATCHES:
        z, y = ort.latents(b), labels_for(ort, b)
        with torch.no_grad():
            ref = view(z, y) if y is not None else view(z)
        assert ref.shape == (b, *ort.spec.output_shape)
        assert_agree(ref, ort.decode(z, y), f"{family} onnxruntime batch {b}")
        assert_agree(ref, aoti.decode(z, y), f"{family} aoti batch {b}")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_encoder_eager_onnxruntime_agree(family, onnx_exported):
    export_dir = onnx_exported(family)
    model, _ = load_model(export_dir.parent)
    view = model.export_parts()["encoder"].module.eval()
    sampler = Sampler.load(export_dir)
    for b in BATCHES:
        x = torch.rand(b, *sampler.spec.output_shape)
        y = labels_for(sampler, b)
        with torch.no_grad():
            ref = view(x, y) if y is not None else view(x)
        got = sampler.encode(x, y)
        assert_agree(ref, got, f"{family} encoder batch {b}")
        if sampler.spec.latent_kind == "codes":  # VQ: the codes decode with the decoder
            assert got.dtype == torch.int64 and got.shape == (b, *sampler.spec.latent_shape)
            assert sampler.decode(got).shape == (b, *sampler.spec.output_shape)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_onnx_graph_contract(family, onnx_exported):
    """Opset pinned, no random op, dynamic batch, metadata carrying the model description."""
    export_dir = onnx_exported(family)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    for part in ("decoder", "encoder"):
        proto = onnx.load(str(export_dir / f"{part}.onnx"))
        assert {o.domain: o.version for o in proto.opset_import}[""] == DEFAULT_OPSET
        assert random_ops(proto) == []
        for tensor in (*proto.graph.input, *proto.graph.output):
            assert tensor.type.tensor_type.shape.dim[0].dim_param, f"{tensor.name}: static batch"
        meta = {p.key: p.value for p in proto.metadata_props}
        assert json.loads(meta["model_config"]) == manifest["model"]["config"]
        assert meta["latent_shape"] == ",".join(map(str, manifest["model"]["latent"]["shape"]))
        assert meta["output_shape"] == ",".join(map(str, manifest["model"]["output_shape"]))
        assert meta["input_names"] == ",".join(i.name for i in proto.graph.input)
        entry = manifest["artifacts"][f"{part}.onnx"]
        assert entry["parity"]["passed"] and entry["parity"]["max_abs"] < 1e-4
        assert entry["parity"]["batches"] == list(BATCHES)
        assert entry["inputs"][0]["shape"][0] == "batch"
        assert entry["settings"]["opset"] == DEFAULT_OPSET


@pytest.mark.parametrize("family", ["mlp", "vqvae"])
def test_manifest_holds_onnx_and_aoti_entries(family, aoti_exported):
    export_dir = aoti_exported(family)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    formats = {f: e["format"] for f, e in manifest["artifacts"].items()}
    assert formats == {"decoder.onnx": "onnx", "encoder.onnx": "onnx", "decoder.pt2": "aoti"}
    pt2 = manifest["artifacts"]["decoder.pt2"]
    assert pt2["device"] == "cpu" and pt2["parity"]["passed"]
    meta = torch._inductor.aoti_load_package(str(export_dir / "decoder.pt2")).get_metadata()
    latent = manifest["model"]["latent"]
    assert meta["latent_shape"] == ",".join(map(str, latent["shape"]))
    assert meta["latent_kind"] == latent["kind"]
    assert meta["output_shape"] == ",".join(map(str, manifest["model"]["output_shape"]))
    assert meta["conditional"] == "0" and meta["input_names"] == latent["name"]


def test_conditional_metadata(onnx_exported):
    export_dir = onnx_exported("cvae-conv")
    manifest = json.loads((export_dir / "manifest.json").read_text())
    model = manifest["model"]
    assert model["conditional"] and model["num_classes"] == 10 and model["label_input"] == "y"
    assert [i["name"] for i in manifest["artifacts"]["decoder.onnx"]["inputs"]] == ["z", "y"]
    assert manifest["artifacts"]["decoder.onnx"]["inputs"][1]["dtype"] == "int64"


def test_crystal_decoder_with_extra_inputs(checkpoints, tmp_path):
    """A family with several heads and a second input (the atom mask): export stays generic."""
    from engine.models.registry import FAMILIES
    from export.onnx import export_onnx

    if "crystal" not in FAMILIES:
        pytest.skip("the crystal family is not registered")
    run = checkpoints("crystal")
    export_onnx(run, tmp_path, parts="decoder", batches=(1, 7))
    ort, eager = Sampler.load(tmp_path), Sampler.load(run)
    assert ort.spec.extra_inputs == ("mask",) and not ort.spec.conditional
    n_atoms = ort.spec.latent_shape[0]
    mask = torch.arange(n_atoms) < torch.randint(1, n_atoms + 1, (7, 1))
    a = ort.sample(7, seed=0, batch_size=3, mask=mask)
    b = eager.sample(7, seed=0, mask=mask)
    assert isinstance(a, tuple) and len(a) == len(b) == 4
    assert_agree(tuple(b), tuple(a), "crystal heads")
    with pytest.raises(ValueError, match=r"missing \['mask'\]"):
        ort.sample(2)


def test_compare_fails_on_nan_in_the_export_and_refuses_a_nan_reference():
    from export.common import ExportError, check_parity

    ref = torch.rand(4, 3)
    got = ref.clone()
    got[int(torch.randint(4, ())), int(torch.randint(3, ()))] = float("nan")
    assert compare((ref,), (got,))["max_abs"] == float("inf")
    with pytest.raises(ExportError, match="parity check failed: max_abs inf"):
        check_parity("decoder.onnx", lambda z: z.sigmoid(), lambda z: z.sigmoid() * float("nan"),
                     ["z"], [torch.zeros(1, 3)], {}, batches=(2,))
    with pytest.raises(ExportError, match="the PyTorch model itself gives NaN/inf"):
        compare((got,), (ref,))
