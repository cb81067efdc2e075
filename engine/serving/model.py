"""The served model: a `Sampler` on one dedicated thread, a dynamic batcher per operation, and
the per-request checks that run before any row joins a batch.

Inputs of one request, as the batcher carries them (every array has B rows):
    decode: (z (B, *latent_shape) [, labels (B,) int64] [, each extra decoder input (B, ...)])
    encode: (x (B, *output_shape) float32 [, labels (B,) int64])
The checks mirror `Sampler.decode` / `Sampler.encode` (shape, dtype, finiteness, label range,
code range), so a request that passes them only fails in the model for reasons the batcher
isolates by rerunning the batch's requests one by one.
"""

from __future__ import annotations

import asyncio
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from engine.runtime import Sampler
from engine.serving.batcher import DynamicBatcher
from engine.serving.codec import RequestError
from engine.serving.metrics import Metrics
from export import manifest

LABEL_FIELD = "labels"  # the query / .npz field of per-row class labels (X-Labels: the header)


@dataclass(frozen=True)
class ServeConfig:
    """What `python -m engine.serve` was asked for (see its --help)."""

    artifact: str
    backend: str | None = None
    device: str | None = None
    compile: bool = False
    threads: int | None = None  # ONNX Runtime intra-op threads and torch's threads
    max_batch: int = 64
    max_delay_ms: float = 2.0
    max_queue: int = 1024
    max_body_bytes: int = 64 << 20
    max_sample: int = 256  # largest n of POST /v1/sample


def as_numpy(t: Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype is torch.bfloat16 else t).numpy()


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def shape_fits(shape: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    """Whether a per-row shape matches the spec's; None (or <= 0) marks a dynamic axis."""
    return len(shape) == len(expected) and all(
        e is None or e <= 0 or s == e for s, e in zip(shape, expected))


def manifest_input_dtypes(artifact: Path) -> dict[str, np.dtype]:
    """name -> dtype of an artifact's inputs, from the manifest beside it ({} without one)."""
    try:
        entry = manifest.read(artifact.parent).get("artifacts", {}).get(artifact.name) or {}
        return {s["name"]: np.dtype(s["dtype"]) for s in entry.get("inputs", [])}
    except (manifest.ManifestError, KeyError, TypeError):  # no usable manifest: no dtype check
        return {}


def is_image_spec(spec: Any) -> bool:
    """Whether the decoder's output is one image tensor (C, H, W) with 1 or 3 channels."""
    shape = tuple(spec.output_shape)
    return len(spec.output_names) == 1 and len(shape) == 3 and shape[0] in (1, 3)


class ModelService:
    """Loads the model off the event loop, warms it, and runs it through the batchers."""

    def __init__(self, config: ServeConfig, metrics: Metrics) -> None:
        self.config, self.metrics = config, metrics
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="vae-model")
        self.sampler: Sampler | None = None
        self.status, self.error = "loading", ""
        self.encode_error: str | None = None
        self.input_dtypes: dict[str, np.dtype] = {}  # the decoder's, where a manifest says
        self.latent_dtype = np.dtype(np.float32)
        delay = config.max_delay_ms / 1000
        common = {"max_batch": config.max_batch, "max_delay_s": delay,
                  "max_queue": config.max_queue, "executor": self.executor,
                  "wait_for_arrivals": True}
        self.decoder = DynamicBatcher(self._decode, on_batch=metrics.batch_observer("decode"),
                                      **common)
        self.encoder = DynamicBatcher(self._encode, on_batch=metrics.batch_observer("encode"),
                                      **common)
        metrics.track_queue("decode", lambda: self.decoder.depth)
        metrics.track_queue("encode", lambda: self.encoder.depth)

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load and warm on the model thread; the batchers start once that succeeded."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.executor, self._load_and_warm)
        except Exception as e:  # any load failure is reported by /healthz, never raised
            self.status, self.error = "failed", f"{type(e).__name__}: {e}"
            return
        self.decoder.start()
        self.encoder.start()
        self.status = "ready"
        self.metrics.ready.set(1)

    async def close(self) -> None:
        """Finish every queued request, then release the model thread."""
        await self.decoder.close()
        await self.encoder.close()
        self.executor.shutdown(wait=True)

    def _load_and_warm(self) -> None:
        c = self.config
        if c.threads:
            torch.set_num_threads(c.threads)
        self.sampler = Sampler.load(c.artifact, backend=c.backend, device=c.device,
                                    compile=c.compile, threads=c.threads)
        spec = self.sampler.spec
        self.input_dtypes = manifest_input_dtypes(Path(self.sampler.artifact))
        self.latent_dtype = numpy_dtype(spec.latent_dtype)
        # Warm-up at batch 1 and --max-batch (a batch that does not fit fails here, not on a
        # request); skipped for extra inputs (a crystal's mask has no neutral value) and for
        # latents with dynamic axes (no shape to draw).
        if not spec.extra_inputs and _concrete(spec.latent_shape):
            for rows in sorted({1, c.max_batch}):
                self._decode(self._with_labels((as_numpy(self.sampler.latents(rows, 0)),)))
        try:  # a probe: no encoder exported, or one the runtime cannot feed (a crystal's)
            self._encode(self._with_labels((np.zeros((1, *spec.output_shape), np.float32),)))
        except Exception as e:  # backends raise their own types (ORT's InvalidArgument, ...)
            self.encode_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"

    def _with_labels(self, inputs: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        if not self.sampler.spec.conditional:
            return inputs
        return (*inputs, np.zeros(inputs[0].shape[0], np.int64))

    @property
    def spec(self) -> Any:
        """The model's spec once it is ready to serve; a 503 before."""
        if self.status != "ready":
            raise RequestError(f"the model is not ready ({self.status}); retry shortly", 503,
                               {"Retry-After": "1"})
        return self.sampler.spec

    # --- on the model thread ---------------------------------------------------------------
    def _decode(self, inputs: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        spec, tensors = self.sampler.spec, [torch.from_numpy(a) for a in inputs]
        labels = tensors[1] if spec.conditional else None
        extra = dict(zip(spec.extra_inputs, tensors[1 + spec.conditional:]))
        out = self.sampler.decode(tensors[0], labels, **extra)
        return tuple(as_numpy(o) for o in (out if isinstance(out, tuple) else (out,)))

    def _encode(self, inputs: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        labels = torch.from_numpy(inputs[1]) if len(inputs) > 1 else None
        out = self.sampler.encode(torch.from_numpy(inputs[0]), labels)
        return tuple(as_numpy(o) for o in (out if isinstance(out, tuple) else (out,)))

    def latents(self, n: int, seed: int) -> np.ndarray:
        """n prior draws for `seed`, as Sampler.sample(n, seed=seed) draws them."""
        return as_numpy(self.sampler.latents(n, seed))

    # --- per-request checks (on the event loop, before batching) ---------------------------
    def decode_inputs(self, arrays: dict[str, np.ndarray], labels: list[int] | None
                      ) -> tuple[np.ndarray, ...]:
        """The decode request's inputs in the decoder's order, each checked."""
        spec = self.spec
        latent_name = spec.input_names[0]
        label_names = {LABEL_FIELD, *spec.input_names[1:1 + spec.conditional]}
        allowed = [latent_name, *spec.extra_inputs, *sorted(label_names)]
        unknown = sorted(set(arrays) - set(allowed))
        if unknown:
            raise RequestError(f"unknown array(s) {unknown} in the .npz; this {spec.family}"
                               f" decoder takes {allowed[:1 + len(spec.extra_inputs)]}"
                               f" (labels as {LABEL_FIELD!r})")
        missing = [n for n in (latent_name, *spec.extra_inputs) if n not in arrays]
        if missing:
            raise RequestError(f"this {spec.family} decoder takes {list(spec.input_names)}; the"
                               f" body lacks {missing}: send an {'.npz'} with arrays named"
                               f" {[latent_name, *spec.extra_inputs]}")
        z = self._check_latent(arrays[latent_name], self.latent_dtype)
        inputs = (z, *self._labels(arrays, label_names, labels, z.shape[0]))
        for name in spec.extra_inputs:
            a = arrays[name]
            if a.shape[:1] != z.shape[:1]:
                raise RequestError(f"input {name!r} has shape {a.shape}; it needs the latent's"
                                   f" {z.shape[0]} rows")
            want = self.input_dtypes.get(name, a.dtype)
            if a.dtype != want:
                raise RequestError(f"input {name!r} must have dtype {want}, got {a.dtype}")
            inputs += (a,)
        return inputs

    def encode_inputs(self, arrays: dict[str, np.ndarray], labels: list[int] | None
                      ) -> tuple[np.ndarray, ...]:
        spec = self.spec
        if self.encode_error is not None:
            raise RequestError(f"this artifact cannot encode: {self.encode_error}", 501)
        unknown = sorted(set(arrays) - {"x", LABEL_FIELD})
        if unknown or "x" not in arrays:
            raise RequestError(f"expected the images as an .npy, or an .npz with arrays 'x'"
                               f" (and {LABEL_FIELD!r}), got {sorted(arrays)}")
        x = arrays["x"]
        want = f"(B, {', '.join(map(str, spec.output_shape))}) float32"
        if x.ndim < 1 or not shape_fits(x.shape[1:], spec.output_shape) or x.shape[0] < 1:
            raise RequestError(f"expected images of shape {want}, got {x.shape} {x.dtype}")
        if x.dtype != np.float32:
            raise RequestError(f"expected images of dtype float32 {want}, got {x.dtype}: convert"
                               " with .astype(numpy.float32)")
        _require_finite(x, "the images")
        return (x, *self._labels(arrays, {LABEL_FIELD}, labels, x.shape[0]))

    def _check_latent(self, z: np.ndarray, dtype: np.dtype) -> np.ndarray:
        spec = self.spec
        want = f"(B, {', '.join(map(str, spec.latent_shape))}) {dtype}"
        if z.ndim < 1 or not shape_fits(z.shape[1:], spec.latent_shape) or z.shape[0] < 1:
            hint = ""
            if z.ndim == 2 and len(spec.latent_shape) == 1 and \
                    z.shape[1] == 2 * spec.latent_shape[0]:
                hint = ": did you send the encoder's (mu, logvar) instead of a latent?"
            raise RequestError(f"expected a latent of shape {want}, got {z.shape} {z.dtype}{hint}")
        if z.dtype != dtype:
            raise RequestError(f"expected a latent of dtype {dtype} {want}, got {z.dtype}: convert"
                               f" with .astype(numpy.{dtype})")
        if spec.latent_kind == "codes":
            if z.min() < 0 or z.max() >= spec.num_codes:
                raise RequestError(f"codes must lie in [0, {spec.num_codes}), got values in"
                                   f" [{z.min()}, {z.max()}]")
        else:
            _require_finite(z, "the latent")
        return z

    def _labels(self, arrays: dict[str, np.ndarray], names: set[str], labels: list[int] | None,
                rows: int) -> tuple[np.ndarray, ...]:
        """() for an unconditional model; else the (rows,) int64 labels from the query /
        header (`labels`) or the .npz, checked."""
        spec = self.spec
        given = [n for n in sorted(names) if n in arrays]
        if len(given) + (labels is not None) > 1:
            raise RequestError(f"labels were given twice ({given + ['query/header'] * bool(labels)}"
                               f"); send them once")
        values = arrays[given[0]] if given else labels
        if not spec.conditional:
            if values is not None:
                raise RequestError(f"this {spec.family} model is unconditional; send no labels")
            return ()
        if values is None:
            raise RequestError(f"this conditional {spec.family} model needs labels: ?{LABEL_FIELD}"
                               f"=3 (one class for every row) or ?{LABEL_FIELD}=0,1,... ({rows}"
                               f" values), the X-Labels header, or an .npz array"
                               f" {LABEL_FIELD!r}; classes are 0..{spec.num_classes - 1}")
        y = np.asarray(values)
        if y.dtype.kind not in "iu" or y.ndim != 1 or y.shape[0] not in (1, rows):
            raise RequestError(f"expected integer labels of shape ({rows},) or one label, got"
                               f" {y.shape} {y.dtype}")
        if y.min() < 0 or y.max() >= spec.num_classes:
            raise RequestError(f"labels must lie in [0, {spec.num_classes}), got values in"
                               f" [{y.min()}, {y.max()}]")
        return (np.broadcast_to(y.astype(np.int64), (rows,)),)

    def describe(self) -> dict[str, Any]:
        """The spec and runtime info, JSON-ready (GET /healthz, GET /v1/model)."""
        spec, info = self.spec, self.sampler.info
        return {
            "model": {"family": spec.family, "latent_kind": spec.latent_kind,
                      "latent_shape": list(spec.latent_shape),
                      "latent_dtype": str(numpy_dtype(spec.latent_dtype)),
                      "output_shape": list(spec.output_shape), "conditional": spec.conditional,
                      "num_classes": spec.num_classes, "num_codes": spec.num_codes,
                      "input_names": list(spec.input_names),
                      "output_names": list(spec.output_names), "image": is_image_spec(spec),
                      "encoder": self.encode_error is None},
            "runtime": {"backend": info.backend, "device": info.device,
                        "precision": info.precision, "artifact": str(Path(info.artifact)),
                        "graph_rewrites": list(info.graph_rewrites)},
            "batching": {"max_batch": self.config.max_batch,
                         "max_delay_ms": self.config.max_delay_ms,
                         "max_queue": self.config.max_queue},
        }

    @staticmethod
    def random_seed() -> int:
        return secrets.randbelow(2**31)


def _concrete(shape: tuple[int | None, ...]) -> bool:
    return all(isinstance(d, int) and d > 0 for d in shape)


def _require_finite(a: np.ndarray, what: str) -> None:
    finite = np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise RequestError(f"{what} holds NaN or inf in {bad.size} of {a.shape[0]} rows (first:"
                           f" row {bad[0]}); send finite values")
