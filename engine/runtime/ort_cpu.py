"""ONNX Runtime on the CPU: exact graph rewrites that suit its convolution kernels.

The exported ONNX stays the canonical, portable graph (TensorRT and the CUDA EP read it as is);
the ONNX Runtime CPU backend rewrites a copy in memory before it builds the session. Each rewrite
computes the same sums in another order (float32 round-off only), and each targets one layer
shape that ONNX Runtime's CPU kernels (MLAS, 1.31) handle badly. Per-node profile of the Conv
MNIST decoder at batch 1, 1 thread, on the development VM (see docs/export.md for the table):

1. `narrow Conv -> ConvTranspose`: a stride-1 Conv with few output channels, such as the final
   32 -> 1 image projection (77 us of a 294 us decode). ONNX Runtime either expands the input
   with im2col (C_in*k*k rows of H*W, written then read) or, in its NCHWc layout, pads the output
   channels to a 16-wide block. With C_out << C_in the adjoint order is cheaper: multiply first,
   (C_out*k*k, C_in) @ (C_in, H*W), then scatter-add the C_out*k*k rows (col2im):

       conv:  y[o, i] = sum_{c, t} x[c, i + t - p] W[o, c, t]
            = sum_{c, t'} x[c, i + p' - t'] Wt[c, o, t']     t' = k-1-t, p' = k-1-p
       which is ConvTranspose(stride 1, pads p') with Wt[c, o, t'] = W[o, c, k-1-t'].

2. `small ConvTranspose -> MatMul + Col2Im`: a ConvTranspose whose input has a few pixels,
   such as the 2x2 -> 4x4 first up-sampling layer (63 us -> 36 us). ONNX Runtime computes
   W^T (C_out*k*k, C_in) @ X (C_in, H*W) per image, and H*W = 4 columns fill a quarter of the
   SGEMM kernel's 16-column stripe. The rewrite multiplies all pixels of all images at once,
   (B*H*W, C_in) @ (C_in, C_out*k*k), and lets Col2Im (opset 18) do the scatter-add and crop:

       X (B, C_in, H, W) -> Reshape (B, C_in, L) -> Transpose (B, L, C_in) -> MatMul W2
       -> (B, L, C_out*k*k) -> Transpose (B, C_out*k*k, L) -> Col2Im -> (B, C_out, H', W')
       [-> Add bias (1, C_out, 1, 1)]

   Col2Im over a ConvTranspose's full output ((H-1)*s + k per axis) cropped by pads
   (begin, end - output_padding) is exactly the ConvTranspose; L = H*W block positions.

Both need the weight as an initializer (a constant), 2-D kernels, group 1 and dilation 1; the
second needs the input's spatial size from shape inference and output_padding <= pads end.
Anything else is left as it is.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

# When each rewrite applies: measured on single-layer graphs at batch 1 and 64 (docs/export.md).
# Conv -> ConvTranspose won for C_out in 1..16 with C_out <= C_in / 2 (1.3x to 6x faster) and
# lost at 64 -> 32 channels; ConvTranspose -> MatMul + Col2Im won at 4 input pixels (up to 1.8x),
# tied at 9, lost at 1 and 16, and lost by a node's overhead on small weights (32 -> 16).
NARROW_MAX_OUT = 16  # Conv -> ConvTranspose when C_out <= this and 2 * C_out <= C_in
SMALL_PIXELS = range(4, 10)  # ConvTranspose -> MatMul + Col2Im when H*W is in this range
SMALL_MIN_WEIGHTS = 1 << 16  # ... and the weight has at least this many elements
COL2IM_SINCE = 18  # the ONNX opset that added Col2Im


def rewrite_for_cpu(model: Any) -> tuple[Any, list[str]]:
    """The model with both rewrites applied where they help, and one line per rewritten node.
    `model` is an onnx.ModelProto; it is modified in place and returned."""
    import onnx

    graph = model.graph
    if not any(n.op_type in ("Conv", "ConvTranspose") for n in graph.node):
        return model, []  # nothing to rewrite: skip shape inference (it runs at every load)
    # Constant weights only: an initializer also listed as a graph input can be overridden.
    overridable = {i.name for i in graph.input}
    inits = {t.name: t for t in graph.initializer if t.name not in overridable}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    shapes = _static_shapes(onnx.shape_inference.infer_shapes(model))
    nodes, done = [], []
    for node in graph.node:
        new = _narrow_conv(node, inits, graph) or \
            (_small_conv_transpose(node, inits, graph, shapes) if opset >= COL2IM_SINCE else None)
        if new is None:
            nodes.append(node)
            continue
        nodes.extend(new)
        done.append(f"{node.name or node.output[0]}: {node.op_type} -> "
                    f"{'+'.join(n.op_type for n in new)}")
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)
    return model, done


# --- helpers -------------------------------------------------------------------------------------
def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _used_names(graph: Any) -> set[str]:
    """Every tensor name a node of `graph` or of its subgraphs (If, Loop, Scan) reads."""
    from onnx import AttributeProto

    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for a in node.attribute:
            subgraphs = [a.g] if a.type == AttributeProto.GRAPH else \
                list(a.graphs) if a.type == AttributeProto.GRAPHS else []
            for g in subgraphs:
                used |= _used_names(g)
    return used


def _drop_unused_initializers(graph: Any) -> None:
    """Remove the weights the rewritten nodes no longer read (ONNX Runtime warns on each)."""
    used = _used_names(graph) | {i.name for i in graph.input}  # an input may override one
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) < len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _static_shapes(model: Any) -> dict[str, tuple[int | None, ...]]:
    """Tensor name -> shape (None for a symbolic dim) from shape inference's value_info."""
    shapes = {}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return shapes


def _weight(node: Any, inits: dict[str, Any]) -> np.ndarray | None:
    """The node's 2-D-kernel weight (4-D) when it is a float32 initializer, else None."""
    from onnx import TensorProto, numpy_helper

    t = inits.get(node.input[1]) if len(node.input) > 1 else None
    if t is None or t.data_type != TensorProto.FLOAT or t.data_location == TensorProto.EXTERNAL:
        return None
    w = numpy_helper.to_array(t)
    return w if w.ndim == 4 else None


def _plain(a: dict[str, Any]) -> bool:
    """Group 1, dilation 1, explicit padding: the only form the rewrites reproduce."""
    return a.get("group", 1) == 1 and set(a.get("dilations", [1])) == {1} \
        and a.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")


def _add_init(graph: Any, array: np.ndarray, name: str) -> str:
    """Add `array` as initializer `name`, once: names derive from the source tensor, so a
    weight shared by two rewritten nodes gives the same array twice."""
    from onnx import numpy_helper

    if all(t.name != name for t in graph.initializer):
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return name


# --- 1. narrow Conv -> ConvTranspose -------------------------------------------------------------
def _narrow_conv(node: Any, inits: dict[str, Any], graph: Any) -> list[Any] | None:
    from onnx import helper

    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return None
    w, a = _weight(node, inits), _attrs(node)
    if w is None or not _plain(a) or set(a.get("strides", [1])) != {1}:
        return None
    c_out, c_in, kh, kw = w.shape
    pads = a.get("pads", [0, 0, 0, 0])
    k = [kh, kw, kh, kw]
    if not (c_out <= NARROW_MAX_OUT and 2 * c_out <= c_in) or any(p > t - 1 for p, t in
                                                                  zip(pads, k)):
        return None
    # Wt[c, o, t'] = W[o, c, k-1-t']: swap the channel axes, flip the kernel.
    wt = _add_init(graph, w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3), f"{node.input[1]}/adjoint")
    return [helper.make_node("ConvTranspose", [node.input[0], wt, *node.input[2:]],
                             list(node.output), name=f"{node.name or node.output[0]}/adjoint",
                             kernel_shape=[kh, kw], strides=[1, 1],
                             pads=[t - 1 - p for p, t in zip(pads, k)])]


# --- 2. small ConvTranspose -> MatMul + Col2Im ---------------------------------------------------
def _small_conv_transpose(node: Any, inits: dict[str, Any], graph: Any,
                          shapes: dict[str, tuple[int | None, ...]]) -> list[Any] | None:
    from onnx import helper, numpy_helper

    if node.op_type != "ConvTranspose" or node.domain not in ("", "ai.onnx"):
        return None
    w, a = _weight(node, inits), _attrs(node)
    x_shape = shapes.get(node.input[0], ())
    if w is None or not _plain(a) or "output_shape" in a or len(x_shape) != 4 \
            or None in x_shape[2:]:
        return None
    h, wd = x_shape[2:]
    c_in, c_out, kh, kw = w.shape
    strides = a.get("strides", [1, 1])
    pads = a.get("pads", [0, 0, 0, 0])
    out_pad = a.get("output_padding", [0, 0])
    has_bias = len(node.input) > 2 and node.input[2] != ""
    bias = inits.get(node.input[2]) if has_bias else None
    too_big_pad = any(o > pe for o, pe in zip(out_pad, pads[2:]))
    if h * wd not in SMALL_PIXELS or w.size < SMALL_MIN_WEIGHTS or too_big_pad \
            or (has_bias and bias is None):
        return None
    # Output size per axis: (n-1)*s + k - pad_begin - pad_end + output_padding.
    image = [(n - 1) * s + t - pb - pe + o for n, s, t, pb, pe, o in
             zip((h, wd), strides, (kh, kw), pads[:2], pads[2:], out_pad)]
    base, name = node.output[0], node.name or node.output[0]
    t = lambda suffix: f"{base}/col2im/{suffix}"
    shape = _add_init(graph, np.array([0, c_in, h * wd], np.int64), t("shape"))
    w2 = _add_init(graph, w.reshape(c_in, c_out * kh * kw), t("weight"))
    image_shape = _add_init(graph, np.array(image, np.int64), t("image_shape"))
    block = _add_init(graph, np.array([kh, kw], np.int64), t("block_shape"))
    crop = [*pads[:2], *(pe - o for pe, o in zip(pads[2:], out_pad))]
    out = t("unbiased") if has_bias else base
    nodes = [
        helper.make_node("Reshape", [node.input[0], shape], [t("x")], name=f"{name}/reshape"),
        helper.make_node("Transpose", [t("x")], [t("xt")], perm=[0, 2, 1], name=f"{name}/t0"),
        helper.make_node("MatMul", [t("xt"), w2], [t("cols_t")], name=f"{name}/matmul"),
        helper.make_node("Transpose", [t("cols_t")], [t("cols")], perm=[0, 2, 1],
                         name=f"{name}/t1"),
        helper.make_node("Col2Im", [t("cols"), image_shape, block], [out], name=f"{name}/col2im",
                         strides=list(strides), pads=crop),
    ]
    if has_bias:
        b4 = _add_init(graph, numpy_helper.to_array(bias).reshape(1, c_out, 1, 1), t("bias"))
        nodes.append(helper.make_node("Add", [out, b4], [base], name=f"{name}/bias"))
    return nodes


# --- entry point for the runtime -----------------------------------------------------------------
MAX_BYTES = 1 << 30  # a protobuf cannot exceed 2 GiB; bigger models load from their file as is


def rewritten_bytes(path: str) -> tuple[bytes | None, list[str]]:
    """(serialized rewritten model, what was rewritten) for an ONNX file, or (None, []) when
    no rewrite applies or the file cannot be rewritten here; the caller then loads the file
    itself, and ONNX Runtime's own load reports a corrupt file."""
    try:
        import onnx

        model = onnx.load(path)
    except Exception:  # onnx not installed, or a file onnx cannot parse: the plain load says why
        return None, []
    if model.ByteSize() > MAX_BYTES:
        return None, []
    try:
        model, done = rewrite_for_cpu(model)
    except Exception as e:  # a graph shape inference rejects: run it unrewritten, and say so
        warnings.warn(f"{path}: CPU graph rewrites skipped ({type(e).__name__}: {e})",
                      stacklevel=2)
        return None, []
    return (model.SerializeToString() if done else None), done
