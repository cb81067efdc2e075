"""engine.runtime.ort_cpu: the ONNX Runtime CPU graph rewrites, against torch's convolutions.

Each case builds a one-node ONNX graph with random weights, rewrites it, runs the result in
ONNX Runtime and compares with torch.nn.functional (an independent implementation of the same
layer), on random inputs at several batch sizes; cases outside a rewrite's conditions must come
back untouched."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from engine.runtime import Sampler
from engine.runtime.ort_cpu import rewrite_for_cpu, rewritten_bytes

BATCHES = (1, 3, 8)


def one_node_model(op: str, x_shape, weight: torch.Tensor, bias: torch.Tensor | None,
                   opset: int = 20, weight_as_input: bool = False, **attrs) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(weight.numpy(), "W")]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.numpy(), "b"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", *x_shape])]
    if weight_as_input:  # a weight fed at run time: not a constant, so not rewritable
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(weight.shape)))
        inits = inits[1:]
    node = helper.make_node(op, ["x", "W", *(["b"] if bias is not None else [])], ["y"],
                            name="layer", **attrs)
    graph = helper.make_graph([node], "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=9)


def run(model: onnx.ModelProto, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def conv_reference(x, w, b, pads):
    """ONNX Conv with pads (top, left, bottom, right), stride 1, through torch."""
    top, left, bottom, right = pads
    return F.conv2d(F.pad(x, (left, right, top, bottom)), w, b)


def conv_transpose_reference(x, w, b, strides, pads, out_pad):
    """ONNX ConvTranspose: the full transposed convolution, cropped by pads (begin, end -
    output_padding), plus the bias (the output_padding rows past the full output hold only it)."""
    full = F.conv_transpose2d(x, w, None, stride=strides)  # (B, C_out, (H-1)s + k, ...)
    full = F.pad(full, (0, out_pad[1], 0, out_pad[0]))
    h = full.shape[2] - pads[0] - pads[2]
    wd = full.shape[3] - pads[1] - pads[3]
    y = full[:, :, pads[0]:pads[0] + h, pads[1]:pads[1] + wd]
    return y if b is None else y + b[None, :, None, None]


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# --- 1. narrow Conv -> ConvTranspose -------------------------------------------------------------
@pytest.mark.parametrize(("c_in", "c_out", "k", "pads", "size", "bias"), [
    (32, 1, (3, 3), (1, 1, 1, 1), (28, 28), True),   # the MNIST decoder's last layer
    (64, 3, (3, 3), (1, 1, 1, 1), (16, 12), True),   # RGB, non-square image
    (16, 8, (5, 3), (2, 1, 2, 1), (9, 11), False),   # non-square kernel, no bias
    (12, 2, (3, 3), (0, 2, 1, 0), (10, 10), True),   # asymmetric pads
    (4, 1, (1, 1), (0, 0, 0, 0), (7, 7), True),      # 1x1
    (40, 16, (3, 3), (0, 0, 0, 0), (6, 6), True),    # widest output it rewrites, no padding
])
def test_narrow_conv_matches_torch(c_in, c_out, k, pads, size, bias):
    w = torch.randn(c_out, c_in, *k) / (c_in * k[0] * k[1]) ** 0.5
    b = torch.randn(c_out) if bias else None
    model, done = rewrite_for_cpu(one_node_model("Conv", (c_in, *size), w, b, kernel_shape=k,
                                                 pads=list(pads)))
    assert op_types(model) == ["ConvTranspose"] and len(done) == 1
    assert {t.name for t in model.graph.initializer} == {"W/adjoint", *(["b"] if bias else [])}
    for batch in BATCHES:
        x = torch.randn(batch, c_in, *size)
        torch.testing.assert_close(run(model, x), conv_reference(x, w, b, pads),
                                   rtol=1e-5, atol=1e-5)


# --- 2. small ConvTranspose -> MatMul + Col2Im ---------------------------------------------------
@pytest.mark.parametrize(("c_in", "c_out", "k", "strides", "pads", "out_pad", "size", "bias"), [
    (256, 128, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), (2, 2), True),  # the MNIST decoder's first
    (128, 64, (3, 3), (2, 2), (1, 1, 1, 1), (0, 0), (3, 3), False),
    (96, 48, (4, 4), (2, 2), (1, 1, 1, 1), (0, 0), (2, 3), True),    # even kernel, 2x3 input
    (64, 128, (3, 3), (3, 2), (0, 1, 2, 1), (1, 0), (2, 4), True),   # unequal strides and pads
    (80, 96, (3, 3), (1, 1), (1, 1, 1, 1), (0, 0), (3, 3), True),    # stride 1
])
def test_small_conv_transpose_matches_torch(c_in, c_out, k, strides, pads, out_pad, size, bias):
    w = torch.randn(c_in, c_out, *k) / (c_in * k[0] * k[1]) ** 0.5
    b = torch.randn(c_out) if bias else None
    model, done = rewrite_for_cpu(one_node_model(
        "ConvTranspose", (c_in, *size), w, b, kernel_shape=k, strides=list(strides),
        pads=list(pads), output_padding=list(out_pad)))
    assert "Col2Im" in op_types(model) and "ConvTranspose" not in op_types(model)
    assert len(done) == 1
    for batch in BATCHES:
        x = torch.randn(batch, c_in, *size)
        expected = conv_transpose_reference(x, w, b, strides, pads, out_pad)
        torch.testing.assert_close(run(model, x), expected, rtol=1e-5, atol=1e-5)


# --- what must stay as it is ---------------------------------------------------------------------
def _unchanged(op, x_shape, w, opset=20, weight_as_input=False, **attrs):
    model = one_node_model(op, x_shape, w, None, opset, weight_as_input, **attrs)
    before = model.SerializeToString()
    model, done = rewrite_for_cpu(model)
    return done == [] and model.SerializeToString() == before


def test_layers_outside_the_rules_are_untouched():
    k3 = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    narrow = torch.randn(1, 32, 3, 3)
    assert _unchanged("Conv", (32, 8, 8), torch.randn(32, 32, 3, 3), **k3)  # wide output
    assert _unchanged("Conv", (32, 8, 8), torch.randn(17, 64, 3, 3), **k3)  # > 16 outputs
    assert _unchanged("Conv", (32, 8, 8), narrow, strides=[2, 2], **k3)  # strided
    assert _unchanged("Conv", (32, 8, 8), narrow, dilations=[2, 2], **k3)  # dilated
    assert _unchanged("Conv", (32, 8, 8), torch.randn(2, 16, 3, 3), group=2, **k3)  # grouped
    assert _unchanged("Conv", (32, 8, 8), narrow, weight_as_input=True, **k3)  # not constant
    assert _unchanged("Conv", (32, 8, 8), narrow, kernel_shape=[3, 3], pads=[3, 0, 0, 0])
    assert _unchanged("Conv", (32, 8, 8), narrow, auto_pad="SAME_UPPER",
                      kernel_shape=[3, 3])
    up = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    big = torch.randn(256, 128, 3, 3)
    assert _unchanged("ConvTranspose", (256, 4, 4), big, **up)  # 16 pixels: ORT's own is faster
    assert _unchanged("ConvTranspose", (256, 1, 1), big, **up)  # 1 pixel
    assert _unchanged("ConvTranspose", (32, 2, 2), torch.randn(32, 16, 3, 3), **up)  # small W
    assert _unchanged("ConvTranspose", (256, 2, 2), big, opset=17, **up)  # no Col2Im before 18
    assert _unchanged("ConvTranspose", (256, 2, 2), big, output_padding=[1, 1],
                      kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 0, 0])  # op > pad end


def test_fp16_weights_are_untouched():
    w = torch.randn(1, 32, 3, 3).half()
    model = one_node_model("Conv", (32, 8, 8), w.float(), None, kernel_shape=[3, 3])
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w.numpy(), "W"))
    assert rewrite_for_cpu(model)[1] == []


def test_overridable_weight_is_untouched():
    """Old IR graphs list weights as graph inputs too: a caller may feed another weight, so the
    node must keep reading it (a rewritten constant copy would silently ignore the feed)."""
    w = torch.randn(1, 32, 3, 3)
    model = one_node_model("Conv", (32, 8, 8), w, None, kernel_shape=[3, 3], pads=[1] * 4)
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [1, 32, 3, 3]))
    model, done = rewrite_for_cpu(model)
    assert done == [] and op_types(model) == ["Conv"]
    assert "W" in {t.name for t in model.graph.initializer}


def test_weight_shared_by_two_convs_is_rewritten_once():
    c_in, size = 24, (6, 5)
    w, b = torch.randn(2, c_in, 3, 3) / 15, torch.randn(2)
    model = one_node_model("Conv", (c_in, *size), w, b, kernel_shape=[3, 3], pads=[1] * 4)
    second = helper.make_node("Conv", ["x", "W", "b"], ["y2"], kernel_shape=[3, 3], pads=[1] * 4)
    model.graph.node.append(second)  # unnamed, reads the same weight
    model.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, None))
    model, done = rewrite_for_cpu(model)
    assert op_types(model) == ["ConvTranspose", "ConvTranspose"] and len(done) == 2
    assert sorted(t.name for t in model.graph.initializer) == ["W/adjoint", "b"]
    x = torch.randn(2, c_in, *size)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y1, y2 = session.run(None, {"x": x.numpy()})
    expected = conv_reference(x, w, b, (1, 1, 1, 1))
    torch.testing.assert_close(torch.from_numpy(y1), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(y2), expected, rtol=1e-5, atol=1e-5)


def test_rewritten_bytes_of_a_corrupt_file_defers_to_onnxruntime(tmp_path):
    bad = tmp_path / "decoder.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    assert rewritten_bytes(str(bad)) == (None, [])


# --- through the Sampler -------------------------------------------------------------------------
def test_sampler_runs_the_rewritten_conv_decoder(onnx_exported):
    """conv-small's 16 -> 1 image projection is rewritten; outputs match the graph as exported
    and the eager model, and cpu_rewrites=False runs the file as is."""
    from engine.checkpoint import load_model

    path = onnx_exported("conv") / "decoder.onnx"
    fast = Sampler.load(path, device="cpu")
    plain = Sampler.load(path, device="cpu", cpu_rewrites=False)
    assert any("Conv -> ConvTranspose" in r for r in fast.info.graph_rewrites)
    assert plain.info.graph_rewrites == ()
    model = load_model(onnx_exported("conv").parent)[0].eval()
    for batch in BATCHES:
        z = torch.randn(batch, *fast.spec.latent_shape)
        with torch.inference_mode():
            eager = model.decode(z)
        torch.testing.assert_close(fast.decode(z), plain.decode(z), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.decode(z), eager, rtol=1e-4, atol=1e-5)


def test_refused_rewrite_runs_the_file_as_exported(onnx_exported, monkeypatch):
    """If ONNX Runtime refuses the rewritten graph, the Sampler warns and loads the file."""
    import engine.runtime.ort_cpu as cpu

    path = onnx_exported("conv") / "decoder.onnx"
    monkeypatch.setattr(cpu, "rewritten_bytes", lambda p: (b"not a model", ["fake"]))
    with pytest.warns(UserWarning, match="refused the CPU-rewritten graph"):
        sampler = Sampler.load(path, device="cpu")
    assert sampler.info.graph_rewrites == ()
    z = torch.randn(2, *sampler.spec.latent_shape)
    plain = Sampler.load(path, device="cpu", cpu_rewrites=False)
    torch.testing.assert_close(sampler.decode(z), plain.decode(z), rtol=0, atol=0)


def test_mlp_decoder_has_nothing_to_rewrite(onnx_exported):
    path = onnx_exported("mlp") / "decoder.onnx"
    assert Sampler.load(path, device="cpu").info.graph_rewrites == ()
    assert rewritten_bytes(str(path)) == (None, [])


def test_rewritten_model_keeps_the_metadata(onnx_exported):
    path = onnx_exported("conv") / "decoder.onnx"
    data, done = rewritten_bytes(str(path))
    assert done
    meta = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    assert meta == {p.key: p.value for p in onnx.load(path).metadata_props}
    assert np.isin(["latent_shape", "input_names"], list(meta)).all()
