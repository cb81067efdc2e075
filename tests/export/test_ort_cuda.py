"""engine.runtime.ort_cuda: IOBinding and the CUDA-graph runner.

The binding code is device-agnostic, so on CPU it runs a real ONNX Runtime CPU session on CPU
tensors and is checked against plain `session.run`; the GPU test (cuda marker) checks the same
on the CUDA EP with enable_cuda_graph=1 when onnxruntime-gpu and a GPU are present."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch

from engine.runtime import Sampler
from engine.runtime.ort_cuda import CudaGraphRunner, output_buffers, run_bound, supports_graph_ids


class CountingSession:
    """A real InferenceSession that counts io_binding() calls and records run options."""

    def __init__(self, path):
        self.inner = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.bindings, self.graph_ids = 0, []

    def io_binding(self):
        self.bindings += 1
        return self.inner.io_binding()

    def run_with_iobinding(self, binding, options=None):
        self.graph_ids.append(options.get_run_config_entry("gpu_graph_id") if options else None)
        return self.inner.run_with_iobinding(binding, options)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def reference(session, inputs):
    names = [i.name for i in session.get_inputs()]
    return [torch.from_numpy(o) for o in session.run(None, {n: t.numpy() for n, t in
                                                            zip(names, inputs)})]


@pytest.mark.parametrize("family", ["mlp", "cvae-conv"])
def test_run_bound_matches_session_run(onnx_exported, family):
    session = ort.InferenceSession(str(onnx_exported(family) / "decoder.onnx"),
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    batch = int(torch.randint(1, 9, ()))
    inputs = [torch.randn(batch, 8)[:, :8].t().contiguous().t()]  # a column-major view
    if family == "cvae-conv":
        inputs.append(torch.randint(0, 10, (batch,)))
    got = run_bound(session, names, inputs)
    for g, e in zip(got, reference(session, [t.contiguous() for t in inputs])):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=0)


def test_graph_runner_binds_once_per_shape_and_returns_fresh_outputs(onnx_exported):
    session = CountingSession(onnx_exported("mlp") / "decoder.onnx")
    runner = CudaGraphRunner(session, ["z"], max_graphs=2)
    first = {}
    for _ in range(3):
        for batch in (1, 5):
            z = torch.randn(batch, 8)
            out = runner([z])[0]
            torch.testing.assert_close(out, reference(session, [z])[0], atol=1e-6, rtol=0)
            first.setdefault(batch, (out, out.clone()))
    assert session.bindings == 2 and runner.captured == 2  # one static binding per shape
    assert set(session.graph_ids) == {"1", "2"}  # a graph id of its own per shape
    for out, copy in first.values():  # later replays did not overwrite what was returned
        torch.testing.assert_close(out, copy, atol=0, rtol=0)
    z = torch.randn(3, 8)  # a third shape, past max_graphs: uncaptured, fresh binding
    torch.testing.assert_close(runner([z])[0], reference(session, [z])[0], atol=1e-6, rtol=0)
    assert runner.captured == 2 and session.bindings == 3 and session.graph_ids[-1] == "-1"


def test_output_buffers_refuse_symbolic_dims():
    class Out:
        name, shape, type = "atoms", ["batch", "n_atoms", 3], "tensor(float)"

    class Session:
        def get_outputs(self):
            return [Out()]

    with pytest.raises(ValueError, match="symbolic non-batch dims"):
        output_buffers(Session(), 2, torch.device("cpu"))


@pytest.mark.parametrize("version, ok", [("1.17.3", False), ("1.18.0", True), ("1.31.1", True),
                                         ("2.0.0", True), ("1.9.0", False), ("1.22.0+cu12", True),
                                         ("1.20.0.dev20250101", True), ("main", True)])
def test_graph_ids_need_onnxruntime_1_18(version, ok):
    assert supports_graph_ids(version) is ok


def test_cpu_sessions_report_no_cuda_graphs(onnx_exported):
    assert Sampler.load(onnx_exported("mlp")).info.cuda_graphs is False


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available()
                    or "CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs a GPU and onnxruntime-gpu (CUDA EP)")
def test_cuda_graph_sampler_matches_plain_iobinding(onnx_exported):
    export_dir = onnx_exported("mlp")
    graphs = Sampler.load(export_dir / "decoder.onnx", device="cuda")
    plain = Sampler.load(export_dir / "decoder.onnx", device="cuda", cuda_graphs=False)
    assert graphs.info.cuda_graphs and not plain.info.cuda_graphs
    for batch in (1, 7, 1, 256, 7):
        z = torch.randn(batch, 8, device="cuda")
        torch.testing.assert_close(graphs.decode(z), plain.decode(z), atol=1e-5, rtol=0)


@pytest.mark.parametrize("capture_ok", [True, False])
def test_session_falls_back_when_graph_capture_is_refused(capture_ok, tmp_path):
    from engine.runtime.backends import OnnxRuntimeBackend

    tried = []

    class FakeOrt:
        __version__ = "1.31.0"

        @staticmethod
        def InferenceSession(path, opts, providers):
            tried.append(providers)
            if "enable_cuda_graph" in providers[0][1] and not capture_ok:
                raise RuntimeError("not all nodes are on the CUDA EP")
            return "session"

    backend = OnnxRuntimeBackend.__new__(OnnxRuntimeBackend)
    cuda = ("CUDAExecutionProvider", {"user_compute_stream": "7"})
    session = backend._session(FakeOrt, tmp_path / "m.onnx", None, [cuda, "CPUExecutionProvider"],
                               cuda_graphs=True)
    assert session == "session" and backend.cuda_graphs is capture_ok
    assert tried[0][0] == ("CUDAExecutionProvider",
                           {"user_compute_stream": "7", "enable_cuda_graph": "1"})
    assert tried[-1][0] == (cuda if not capture_ok else tried[0][0])
    assert len(tried) == (1 if capture_ok else 2)
