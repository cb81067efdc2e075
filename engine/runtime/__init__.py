"""The runtime: load an exported (or checkpointed) VAE and sample, decode and encode in batches.

    from engine.runtime import Sampler
    s = Sampler.load("runs/mnist/export")
    images = s.sample(64, seed=0)

`sampler.py` holds `Sampler` and the artifact resolution; `backends.py` one small class per
backend (ONNX Runtime, TensorRT, AOTInductor, PyTorch) and the selection tables; `types.py` the
spec, info and error types; `ort_cpu.py` / `ort_cuda.py` the ONNX Runtime CPU graph rewrites and
the CUDA-graph IOBinding runner.
"""

from engine.runtime.backends import BACKENDS, FORMAT_BACKEND, PREFERENCE, SUFFIX_BACKEND, Backend
from engine.runtime.sampler import DEFAULT_CHUNK, Sampler, resolve
from engine.runtime.types import InputError, ModelSpec, RuntimeInfo, SamplerError, require_finite

__all__ = [
    "BACKENDS", "DEFAULT_CHUNK", "FORMAT_BACKEND", "PREFERENCE", "SUFFIX_BACKEND", "Backend",
    "InputError", "ModelSpec", "RuntimeInfo", "Sampler", "SamplerError", "require_finite",
    "resolve",
]
