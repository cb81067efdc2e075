"""ONNX Runtime on the GPU: IOBinding on torch tensors, and CUDA graphs on top of it.

Plain path (`run_bound`): every input is bound by its device pointer and every output to a
torch tensor allocated for this call, so nothing crosses to the host; ONNX Runtime runs on
torch's current stream (the `user_compute_stream` provider option, see runtime_backends).

CUDA graphs (`CudaGraphRunner`; CUDA EP option `enable_cuda_graph=1`): ONNX Runtime captures a
whole run once and afterwards replays it with one launch, which removes the per-kernel launch
cost that dominates small batches. A replay reads and writes the *same addresses*, so:
  - each distinct input signature (shapes, dtypes) gets static torch buffers, bound once, and a
    graph of its own (run option `gpu_graph_id` = 1, 2, ...; ONNX Runtime keeps one graph per id);
  - a call copies its inputs into the static buffers, replays, and returns clones of the static
    outputs (the next replay overwrites them);
  - at most `max_graphs` signatures are captured (each holds its buffers and ONNX Runtime's
    graph memory); further ones run uncaptured (`gpu_graph_id=-1`) on per-call bindings.
Sampler.sample() decodes in chunks of one fixed size, so it uses one or two graphs.

Nothing here is CUDA-specific beyond what the session was built with: the same code runs a CPU
session on CPU tensors, which is how the tests check the binding logic on machines without GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

NP_DTYPES: dict[torch.dtype, Any] = {torch.float32: np.float32, torch.float16: np.float16,
                                     torch.int64: np.int64, torch.int32: np.int32}
ORT_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
              "tensor(int64)": torch.int64, "tensor(int32)": torch.int32}
MAX_GRAPHS = 8
GRAPH_IDS_SINCE = (1, 18)  # onnxruntime release that added the gpu_graph_id run option


def supports_graph_ids(version: str) -> bool:
    """Whether this onnxruntime keeps one CUDA graph per gpu_graph_id. Older releases capture a
    single graph per session and would replay it for any shape, so graphs stay off there."""
    parts = version.split("+")[0].split(".")[:2]
    try:
        return tuple(int(p) for p in parts) >= GRAPH_IDS_SINCE
    except ValueError:  # a development version string: assume a recent build
        return True


def output_buffers(session: Any, batch: int, device: torch.device) -> list[Tensor]:
    """Uninitialized outputs (batch, *static dims) for each of the session's outputs."""
    outs = []
    for o in session.get_outputs():
        dims = o.shape[1:]
        if not all(isinstance(d, int) for d in dims):
            raise ValueError(f"output {o.name!r} has symbolic non-batch dims {o.shape}: IOBinding"
                             " needs them static; re-export with fixed shapes past the batch")
        outs.append(torch.empty((batch, *dims), dtype=ORT_DTYPES[o.type], device=device))
    return outs


def bind(binding: Any, names: Sequence[str], tensors: Sequence[Tensor], output: bool) -> None:
    """Bind contiguous torch tensors by device pointer (no copy)."""
    method = binding.bind_output if output else binding.bind_input
    for name, t in zip(names, tensors):
        method(name, t.device.type, t.device.index or 0, np.dtype(NP_DTYPES[t.dtype]),
               list(t.shape), t.data_ptr())


def run_bound(session: Any, input_names: Sequence[str], inputs: Sequence[Tensor],
              run_options: Any = None) -> list[Tensor]:
    """One run on fresh bindings: inputs by pointer, outputs allocated by torch."""
    inputs = [t.contiguous() for t in inputs]
    outs = output_buffers(session, inputs[0].shape[0], inputs[0].device)
    binding = session.io_binding()
    bind(binding, input_names, inputs, output=False)
    bind(binding, [o.name for o in session.get_outputs()], outs, output=True)
    session.run_with_iobinding(binding, run_options)
    return outs


@dataclass
class _Graph:
    """One captured signature: its static buffers, binding and run options."""

    inputs: list[Tensor]
    outputs: list[Tensor]
    binding: Any
    options: Any


class CudaGraphRunner:
    """`runner(inputs) -> outputs` over a session built with enable_cuda_graph=1."""

    def __init__(self, session: Any, input_names: Sequence[str], max_graphs: int = MAX_GRAPHS
                 ) -> None:
        import onnxruntime as ort

        self.session, self.input_names, self.max_graphs = session, tuple(input_names), max_graphs
        self._output_names = [o.name for o in session.get_outputs()]
        self._graphs: dict[tuple, _Graph] = {}
        self._ort = ort
        self._uncaptured = self._options(-1)

    def _options(self, graph_id: int) -> Any:
        options = self._ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return options

    def __call__(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        graph = self._graphs.get(key)
        if graph is None:
            if len(self._graphs) >= self.max_graphs:
                return run_bound(self.session, self.input_names, inputs, self._uncaptured)
            graph = self._graphs[key] = self._new_graph(inputs, len(self._graphs) + 1)
        for buffer, t in zip(graph.inputs, inputs):
            buffer.copy_(t)
        self.session.run_with_iobinding(graph.binding, graph.options)
        return [o.clone() for o in graph.outputs]

    def _new_graph(self, inputs: Sequence[Tensor], graph_id: int) -> _Graph:
        static_in = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in inputs]
        static_out = output_buffers(self.session, inputs[0].shape[0], inputs[0].device)
        binding = self.session.io_binding()
        bind(binding, self.input_names, static_in, output=False)
        bind(binding, self._output_names, static_out, output=True)
        return _Graph(static_in, static_out, binding, self._options(graph_id))

    @property
    def captured(self) -> int:
        """How many input signatures have a graph of their own."""
        return len(self._graphs)
