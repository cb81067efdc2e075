"""The HTTP API of `python -m engine.serve`: a Starlette app, run by uvicorn.

    GET  /healthz     200 {"status": "ok", "model": spec, "runtime": backend...} once the model
                      is loaded and warmed; 503 {"status": "loading" | "failed"} before
    GET  /v1/model    the same, plus the latent explorer's slider dims ("explorer")
    POST /v1/decode   .npy latents (B, *latent_shape) -> .npy outputs (B, *output_shape);
                      an .npz for several inputs/outputs (a crystal's mask and heads);
                      `Accept: image/png` -> a PNG grid (image models)
    POST /v1/encode   .npy images (B, *output_shape) float32 -> .npy posterior means (or VQ
                      codes); `Accept: application/x-npz` -> mu and logvar
    POST /v1/sample   JSON {"n", "seed"?, "labels"?, "format": "png" | "npy", "nrow"?} -> a PNG
                      grid (default) or .npy; the seed is echoed in X-Seed
    GET  /metrics     Prometheus text format (engine.serving.metrics)
    GET  /            the latent explorer (static/index.html)

Labels of conditional models: the query field `labels` (`?labels=3` for every row, or
`?labels=0,1,2` one per row), else the header `X-Labels` (same syntax), else an .npz array
`labels`. Errors are JSON `{"error": "..."}`: 400 bad input, 413 body over --max-body-mb, 415
content type, 501 no encoder, 503 full queue / not ready / draining (with Retry-After).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from engine.runtime import SamplerError
from engine.serving.batcher import Closed, QueueFull
from engine.serving.codec import (
    NPY,
    NPZ,
    PNG,
    RequestError,
    accepts,
    json_int,
    media_type,
    npy_bytes,
    npz_bytes,
    parse_arrays,
    parse_int_list,
    parse_json,
    png_grid,
    read_body,
)
from engine.serving.explorer import STATIC_DIR, explorer_info
from engine.serving.metrics import CLIENT_GONE, Metrics
from engine.serving.model import LABEL_FIELD, ModelService, ServeConfig, is_image_spec

log = logging.getLogger("engine.serve")
JSON_LIMIT = 64 << 10  # a /v1/sample body is a few fields
SAMPLE_FIELDS = {"n": "rows (1..max)", "seed": "int or null", "labels": "class or n classes",
                 "format": "'png' (default) or 'npy'", "nrow": "images per grid row"}
# Pixel range of the decoders' images, by family (default [0, 1]; a model config may carry
# "output_range": [lo, hi]). The latent-diffusion VAEs decode to [-1, 1].
PIXEL_RANGE = {"autoencoder-kl": (-1.0, 1.0), "autoencoder-tiny": (-1.0, 1.0)}


class ClientGone(Exception):
    """The client disconnected before its reply was ready."""


def pixel_range(spec: Any) -> tuple[float, float]:
    lo, hi = spec.config.get("output_range", PIXEL_RANGE.get(spec.family, (0.0, 1.0)))
    return float(lo), float(hi)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status, headers=headers)


def _check_query(request: Request, allowed: set[str]) -> None:
    if not request.scope["query_string"]:  # the common case: nothing to parse
        return
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        raise RequestError(f"unknown query field(s) {unknown}; this endpoint takes"
                           f" {sorted(allowed) or 'none'}")


def _request_labels(request: Request) -> list[int] | None:
    query, header = request.query_params.get(LABEL_FIELD), request.headers.get("x-labels")
    if query is not None and header is not None:
        raise RequestError("labels were given twice (query and X-Labels header); send them once")
    text = query if query is not None else header
    return None if text is None else parse_int_list(text, LABEL_FIELD)


async def _cancel_when_gone(request: Request, pending: asyncio.Future) -> None:
    """Cancel `pending` when the client goes away (the body was read: receive() waits)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    pending.cancel()


async def _unless_gone(request: Request, pending: asyncio.Future) -> Any:
    """The result of `pending` (a batcher's future), or ClientGone once the client went away
    (then `pending` is cancelled: its rows leave the batch). One watcher task per request."""
    watch = asyncio.ensure_future(_cancel_when_gone(request, pending))
    try:
        return await pending
    except asyncio.CancelledError:
        if watch.done():  # the watcher cancelled it, not a shutdown of this handler
            raise ClientGone from None
        raise
    finally:
        watch.cancel()


class Api:
    """The endpoints, over one ModelService."""

    def __init__(self, config: ServeConfig, service: ModelService, metrics: Metrics) -> None:
        self.config, self.service, self.metrics = config, service, metrics

    def route(self, path: str, fn: Callable[[Request], Awaitable[Response]], method: str
              ) -> Route:
        """A Route whose errors become JSON replies and whose outcome is counted."""
        async def handle(request: Request) -> Response:
            start = time.perf_counter()
            try:
                response = await fn(request)
            except Exception as e:  # every failure becomes a reply: one request never kills
                response = self._failure(e, path)
            self.metrics.observe_request(path, response.status_code, time.perf_counter() - start)
            return response

        return Route(path, handle, methods=[method])

    @staticmethod
    def _failure(e: Exception, path: str) -> Response:
        if isinstance(e, RequestError):
            return _error(e.status, str(e), e.headers)
        if isinstance(e, (QueueFull, Closed)):
            return _error(503, f"{e}; retry later", {"Retry-After": "1"})
        if isinstance(e, (ClientGone, ClientDisconnect)):
            return Response(status_code=CLIENT_GONE)
        if isinstance(e, (ValueError, TypeError, SamplerError)):  # the runtime refused the rows
            return _error(400, str(e))
        log.exception("%s failed", path)
        return _error(500, f"the model failed on this request: {type(e).__name__}: {e}")

    # --- endpoints -------------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        s = self.service
        if s.status != "ready":
            headers = {"Retry-After": "1"} if s.status == "loading" else None
            return JSONResponse({"status": s.status, "error": s.error}, 503, headers=headers)
        return JSONResponse({"status": "ok", **s.describe()})

    async def model(self, request: Request) -> Response:
        spec = self.service.spec
        explorer = explorer_info(self.config.artifact, tuple(spec.latent_shape),
                                 spec.latent_kind)
        return JSONResponse({**self.service.describe(), "explorer": explorer,
                             "pixel_range": list(pixel_range(spec))})

    async def decode(self, request: Request) -> Response:
        _check_query(request, {LABEL_FIELD})
        spec, labels = self.service.spec, _request_labels(request)
        png = accepts(request, PNG)
        if png:
            self._require_images(spec, "Accept: image/png")
        batcher = self.service.decoder
        with batcher.arriving():  # until submitted: a gathering batch may wait for it
            arrays = await self._arrays(request, spec.input_names[0])
            pending = batcher.submit(self.service.decode_inputs(arrays, labels))
        outputs = await _unless_gone(request, pending)
        return await self._reply(request, outputs, spec.output_names, png, whole=True)

    async def encode(self, request: Request) -> Response:
        _check_query(request, {LABEL_FIELD})
        spec, labels = self.service.spec, _request_labels(request)
        batcher = self.service.encoder
        with batcher.arriving():
            inputs = self.service.encode_inputs(await self._arrays(request, "x"), labels)
            pending = batcher.submit(inputs)
        outputs = await _unless_gone(request, pending)
        names = ("codes",) if spec.latent_kind == "codes" else ("mu", "logvar")
        return await self._reply(request, outputs, names, png=False, whole=False)

    async def sample(self, request: Request) -> Response:
        _check_query(request, set())
        spec = self.service.spec
        data = parse_json(await read_body(request, JSON_LIMIT), SAMPLE_FIELDS)
        n = json_int(data, "n", 16, 1, self.config.max_sample)
        seed = json_int(data, "seed", None, 0, 2**63 - 1)
        seed = self.service.random_seed() if seed is None else seed
        nrow = json_int(data, "nrow", None, 1, n)
        fmt = data.get("format", "png")
        if fmt not in ("png", "npy"):
            raise RequestError(f"'format' must be 'png' or 'npy', got {fmt!r}")
        if fmt == "png":
            self._require_images(spec, "format 'png'")
        if spec.extra_inputs:
            raise RequestError(f"this {spec.family} decoder also takes {list(spec.extra_inputs)}:"
                               " draw latents yourself and POST them to /v1/decode as an .npz")
        labels = data.get("labels")
        labels = [labels] if isinstance(labels, int) and not isinstance(labels, bool) else labels
        inputs = self.service.decode_inputs({spec.input_names[0]: self.service.latents(n, seed)},
                                            labels)
        outputs = await _unless_gone(request, self.service.decoder.submit(inputs))
        headers = {"X-Seed": str(seed)}
        if fmt == "png":
            return Response(await self._png(outputs[0], nrow), media_type=PNG, headers=headers)
        return Response(npy_bytes(outputs[0]), media_type=NPY, headers=headers)

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=Metrics.content_type)

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    # --- helpers ---------------------------------------------------------------------------
    async def _arrays(self, request: Request, default_name: str) -> dict[str, np.ndarray]:
        limit = self.config.max_body_bytes
        body = await read_body(request, limit)
        return parse_arrays(body, media_type(request), limit, default_name)

    @staticmethod
    def _require_images(spec: Any, asked: str) -> None:
        if not is_image_spec(spec):
            raise RequestError(f"{asked}: this {spec.family} model's outputs"
                               f" {list(spec.output_names)} are not images (C, H, W) with 1 or 3"
                               f" channels; ask for {NPY} / {NPZ} instead")

    async def _png(self, images: np.ndarray, nrow: int | None = None) -> bytes:
        """PNG encoding off the event loop (large images take tens of ms)."""
        value_range = pixel_range(self.service.spec)
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: png_grid(images, value_range, nrow))

    async def _reply(self, request: Request, outputs: tuple[np.ndarray, ...],
                     names: tuple[str, ...], png: bool, whole: bool) -> Response:
        """A PNG grid of the first output; an .npz of all outputs when asked for (Accept) or,
        with `whole`, when there are several; else an .npy of the first."""
        if png:
            return Response(await self._png(outputs[0]), media_type=PNG)
        if accepts(request, NPZ) or (whole and len(outputs) > 1):
            return Response(npz_bytes(dict(zip(names, outputs))), media_type=NPZ)
        return Response(npy_bytes(outputs[0]), media_type=NPY)


def create_app(config: ServeConfig, on_failure: Callable[[str], None] | None = None,
               freeze_gc: bool = False) -> Starlette:
    """The app; the model loads in the background once it starts (GET /healthz tells).

    on_failure(error) is called if the model fails to load. freeze_gc moves every object alive
    after the warm-up (~200k with torch and ONNX Runtime loaded) out of the garbage
    collector's reach (gc.freeze): a full collection would otherwise scan them all and pause
    the event loop ~0.1 s, the requests' p99. A process-wide setting: the command sets it."""
    metrics = Metrics(config.max_batch)
    service = ModelService(config, metrics)
    api = Api(config, service, metrics)

    def loaded(_: asyncio.Future) -> None:
        if service.status == "failed" and on_failure is not None:
            on_failure(service.error)
        elif service.status == "ready" and freeze_gc:
            gc.collect()
            gc.freeze()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        loading = asyncio.ensure_future(service.start())
        loading.add_done_callback(loaded)
        yield
        await loading  # a load in progress finishes (it cannot be interrupted), then drain
        await service.close()

    routes = [api.route("/v1/decode", api.decode, "POST"),  # the hot path first: matched in order
              api.route("/v1/encode", api.encode, "POST"),
              api.route("/v1/sample", api.sample, "POST"),
              api.route("/healthz", api.healthz, "GET"), api.route("/v1/model", api.model, "GET"),
              api.route("/metrics", api.metrics_text, "GET"), Route("/", api.index),
              Mount("/static", StaticFiles(directory=STATIC_DIR), name="static")]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.service, app.state.metrics = service, metrics
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one, read back from the socket)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on such sockets' connections;
    # without it each reply (headers, then body) stalls 40 ms on Nagle + delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
          access_log: bool = False, drain_timeout_s: float = 30.0) -> int:
    """Run until SIGTERM / SIGINT, then drain in-flight requests (up to drain_timeout_s) and
    return 0; return 1 if the model fails to load."""
    failed: list[str] = []
    holder: dict[str, uvicorn.Server] = {}

    def on_failure(error: str) -> None:
        failed.append(error)
        holder["server"].should_exit = True

    app = create_app(config, on_failure, freeze_gc=True)
    sock = bind(host, port)
    where = sock.getsockname()
    print(f"serving {config.artifact} on http://{host}:{where[1]}/ (pid {os.getpid()})", flush=True)
    uv = uvicorn.Config(app, log_level="info", access_log=access_log, lifespan="on",
                        timeout_graceful_shutdown=drain_timeout_s)
    holder["server"] = server = uvicorn.Server(uv)
    # uvicorn re-raises the signal that stopped it once it has drained; a no-op handler
    # makes that a normal return, so a drained shutdown exits 0.
    before = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if failed:
        print(f"error: the model did not load: {failed[0]}", file=sys.stderr)
        return 1
    return 0
