"""Every kind of bad input gets its status and a JSON error that says what was expected, and
the server stays healthy after all of them: malformed bodies, wrong dtype or shape, NaN/inf,
unknown fields, pickled object arrays, lying headers, zip bombs, over-size bodies (413, also
when streamed without a Content-Length), a full queue (503 + Retry-After), a client that goes
away (its rows are dropped)."""

from __future__ import annotations

import asyncio
import io
import random
import socket
import time
import zipfile

import httpx
import numpy as np
import pytest

from engine.serving.model import ModelService, ServeConfig
from tests.serve.conftest import ThreadServer, wait_ready
from tests.serve.test_server import NPY, metric, npy, npz

NPZ = {"Content-Type": "application/x-npz"}


def _latent(rows: int = 1) -> np.ndarray:
    rng = np.random.default_rng(random.randrange(2**31))
    return rng.standard_normal((rows, 8)).astype(np.float32)


def _nan(rows: int = 2) -> np.ndarray:
    z = _latent(rows)
    z[rows - 1, 2] = np.nan
    return z


def _pickled_object_array() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _lying_header() -> bytes:
    """An .npy header that claims 10^12 rows over 32 bytes of data."""
    data = npy(_latent(1))
    return data.replace(b"(1, 8)", b"(1000000000000, 8)".ljust(6), 1)


def _zip_bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("z.npy", npy(np.zeros((1, 8), np.float32)) + b"\0" * (80 << 20))
    return buf.getvalue()


# (name, body, headers, query, status, words the error must contain)
DECODE_CASES = [
    ("garbage", b"not an array", NPY, "", 400, ".npy"),
    ("float64", npy(_latent().astype(np.float64)), NPY, "", 400, "float32"),
    ("wrong width", npy(np.zeros((1, 5), np.float32)), NPY, "", 400, "(B, 8)"),
    ("mu and logvar", npy(np.zeros((1, 16), np.float32)), NPY, "", 400, "logvar"),
    ("no rows", npy(np.zeros((0, 8), np.float32)), NPY, "", 400, "(B, 8)"),
    ("nan", npy(_nan()), NPY, "", 400, "NaN or inf in 1 of 2 rows (first: row 1)"),
    ("inf", npy(np.full((1, 8), np.inf, np.float32)), NPY, "", 400, "NaN or inf"),
    ("object dtype", _pickled_object_array(), NPY, "", 400, "dtype object"),
    ("truncated", npy(_latent(4))[:-7], NPY, "", 400, "truncated"),
    ("lying header", _lying_header(), NPY, "", 400, "bytes of data"),
    ("unknown query field", npy(_latent()), NPY, "?temperature=2", 400, "temperature"),
    ("labels unconditional", npy(_latent()), NPY, "?labels=3", 400, "unconditional"),
    ("unknown npz array", npz(z=_latent(), w=_latent()), NPZ, "", 400, "unknown array"),
    ("npz without z", npz(x=_latent()), NPZ, "", 400, "unknown array"),
    ("zip bomb", _zip_bomb(), NPZ, "", 413, "decompresses past"),
    ("text body", b"{}", {"Content-Type": "text/plain"}, "", 415, "application/x-npy"),
]


@pytest.fixture(scope="module")
def mlp(server):
    return server("mlp", max_body_bytes=1 << 20)


@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_bad_decode_bodies(mlp, case):
    _, body, headers, query, status, words = case
    r = httpx.post(f"{mlp.url}/v1/decode{query}", content=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


SAMPLE_CASES = [
    ({"n": 4, "temperature": 1.0}, "unknown field(s) ['temperature']"),
    ({"n": 100000}, "'n' must be an integer in [1, 256]"),
    ({"n": True}, "'n' must be an integer"),
    ({"n": 2, "format": "jpeg"}, "'format' must be 'png' or 'npy'"),
    ({"n": 2, "seed": -1}, "'seed' must be an integer"),
    ({"n": 2, "labels": 1}, "unconditional"),
    ([1, 2], "expected a JSON object"),
]


@pytest.mark.parametrize("body,words", SAMPLE_CASES, ids=[str(c[0]) for c in SAMPLE_CASES])
def test_bad_sample_requests(mlp, body, words):
    r = httpx.post(f"{mlp.url}/v1/sample", json=body)
    assert r.status_code == 400 and words in r.json()["error"], r.text


def test_malformed_json_and_bad_encode_input(mlp):
    r = httpx.post(f"{mlp.url}/v1/sample", content=b"{'n': 3", headers={"Content-Type": "json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = httpx.post(f"{mlp.url}/v1/encode", content=npy(np.zeros((2, 28, 28), np.float32)),
                   headers=NPY)
    assert r.status_code == 400 and "(B, 1, 28, 28) float32" in r.json()["error"]


def test_conditional_label_errors(server):
    srv = server("cvae-mlp")
    z = npy(_latent(2))
    for query, words in [("", "needs labels"), ("?labels=10", "[0, 10)"),
                         ("?labels=1,2,3", "shape (2,)"), ("?labels=a", "integer")]:
        r = httpx.post(f"{srv.url}/v1/decode{query}", content=z, headers=NPY)
        assert r.status_code == 400 and words in r.json()["error"], (query, r.text)
    r = httpx.post(f"{srv.url}/v1/decode?labels=1", content=z, headers={**NPY, "X-Labels": "1"})
    assert r.status_code == 400 and "twice" in r.json()["error"]


def test_oversize_bodies_get_413_with_and_without_content_length(mlp):
    big = npy(np.zeros((40000, 8), np.float32))  # 1.28 MB > the 1 MiB limit
    r = httpx.post(f"{mlp.url}/v1/decode", content=big, headers=NPY)
    assert r.status_code == 413 and "1048576 bytes" in r.json()["error"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(big), 64 << 10):
            yield big[i:i + (64 << 10)]

    r = httpx.post(f"{mlp.url}/v1/decode", content=chunks(), headers=NPY)
    assert r.status_code == 413


def test_the_server_is_healthy_after_all_the_bad_input(mlp):
    """Runs after the cases above (file order): the same server still answers correctly."""
    assert wait_ready(mlp.url)["status"] == "ok"
    r = httpx.post(f"{mlp.url}/v1/decode", content=npy(_latent(3)), headers=NPY)
    assert r.status_code == 200
    text = httpx.get(f"{mlp.url}/metrics").text
    assert metric(text, "vae_serve_requests_total", endpoint="/v1/decode", status="400") >= 14


@pytest.fixture
def slow_model(monkeypatch):
    """Every decode call takes 0.2 s more (the model thread sleeps); the list it returns
    records the rows of every call."""
    decode, rows = ModelService._decode, []

    def slow(self, inputs):
        rows.append(inputs[0].shape[0])
        time.sleep(0.2)
        return decode(self, inputs)

    monkeypatch.setattr(ModelService, "_decode", slow)
    return rows


def test_a_full_queue_gives_503_with_retry_after(exported, slow_model):
    config = ServeConfig(str(exported("mlp") / "export"), max_batch=1, max_delay_ms=0.0,
                         max_queue=2)
    srv = ThreadServer(config).start()
    try:
        # One request runs first (0.2 s in the model thread), so the queue is empty and the
        # running row does not count against --max-queue; then 8 arrive at once: 2 fit.
        port = int(srv.url.rsplit(":", 1)[1])
        first = _raw_post(port, npy(_latent(1)))
        deadline = time.monotonic() + 30
        while not slow_model and time.monotonic() < deadline:
            time.sleep(0.005)
        assert slow_model, "the first request never reached the model"

        async def fire():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
                return await asyncio.gather(*(client.post("/v1/decode", content=npy(_latent()),
                                                          headers=NPY) for _ in range(8)))

        replies = asyncio.run(fire())
        assert _read_reply(first).startswith(b"HTTP/1.1 200")
        codes = sorted(r.status_code for r in replies)
        assert codes.count(200) >= 2 and codes.count(503) >= 1 and set(codes) == {200, 503}
        full = next(r for r in replies if r.status_code == 503)
        assert full.headers["retry-after"] == "1" and "--max-queue 2" in full.json()["error"]
        assert wait_ready(srv.url)["status"] == "ok"
    finally:
        srv.stop()


def test_a_client_that_goes_away_is_dropped(exported, slow_model):
    """Three clients queue behind a slow batch; two hang up: only the rows of the one that
    stayed run after the first batch, and the hang-ups are counted as 499."""
    config = ServeConfig(str(exported("mlp") / "export"), max_batch=8, max_delay_ms=0.0)
    srv = ThreadServer(config).start()
    seen = slow_model
    try:
        port = int(srv.url.rsplit(":", 1)[1])
        first = _raw_post(port, npy(_latent(1)))  # runs first, for 0.2 s
        time.sleep(0.05)
        leaving = [_raw_post(port, npy(_latent(2))) for _ in range(2)]
        staying = _raw_post(port, npy(_latent(4)))
        time.sleep(0.05)
        for s in leaving:
            s.close()
        assert b" 200 " in _read_reply(first) and b" 200 " in _read_reply(staying)
        assert seen[-2:] == [1, 4]  # the leaving clients' 2 + 2 rows never ran
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            text = httpx.get(f"{srv.url}/metrics").text
            try:
                if metric(text, "vae_serve_requests_total", endpoint="/v1/decode",
                          status="499") == 2:
                    break
            except KeyError:
                pass
            time.sleep(0.05)
        assert metric(text, "vae_serve_requests_total", endpoint="/v1/decode", status="499") == 2
    finally:
        srv.stop()


def _raw_post(port: int, body: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/decode HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return s


def _read_reply(s: socket.socket) -> bytes:
    s.settimeout(30)
    data = s.recv(65536)
    s.close()
    return data
