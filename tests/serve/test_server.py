"""The real server (uvicorn, in a thread) on a loopback port: rows come back to the request
that sent them and equal Sampler.decode on the same latents; labels, encode, sample; the
batch-size histogram shows batches under concurrency; /healthz says 503 until the model is
warmed."""

from __future__ import annotations

import asyncio
import io
import random
import threading

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from engine.runtime import Sampler
from engine.serving.model import ModelService
from tests.serve.conftest import ThreadServer, wait_ready

NPY = {"Content-Type": "application/x-npy"}


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def load_npy(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-npy"
    return np.load(io.BytesIO(r.content), allow_pickle=False)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (labels in any order)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise KeyError(f"{name}{labels} not in the exposition")


def test_concurrent_one_row_requests_each_get_their_own_row(server, exported):
    srv = server("mlp", max_batch=16, max_delay_ms=20.0)
    reference = Sampler.load(exported("mlp") / "export", device="cpu")
    rng = np.random.default_rng(random.randrange(2**31))
    sizes = [1] * 40 + [3, 2, 5]  # mostly one row, some multi-row requests among them
    latents = [rng.standard_normal((n, 8)).astype(np.float32) for n in sizes]
    before = httpx.get(f"{srv.url}/metrics").text

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v1/decode", content=npy(z), headers=NPY)
                                          for z in latents))

    replies = asyncio.run(fire())
    for z, r in zip(latents, replies):
        got = load_npy(r)
        want = reference.decode(torch.from_numpy(z)).numpy()
        assert got.shape == (z.shape[0], 1, 28, 28)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    after = httpx.get(f"{srv.url}/metrics").text
    calls = (metric(after, "vae_serve_batch_rows_count", op="decode")
             - metric(before, "vae_serve_batch_rows_count", op="decode"))
    rows = (metric(after, "vae_serve_batch_rows_sum", op="decode")
            - metric(before, "vae_serve_batch_rows_sum", op="decode"))
    singles = (metric(after, "vae_serve_batch_rows_bucket", op="decode", le="1.0")
               - metric(before, "vae_serve_batch_rows_bucket", op="decode", le="1.0"))
    assert rows == sum(sizes)
    assert calls < len(sizes) and singles < calls  # batches larger than one row happened
    ok = metric(after, "vae_serve_requests_total", endpoint="/v1/decode", status="200")
    assert ok >= len(sizes)
    assert metric(after, "vae_serve_queue_depth", op="decode") == 0


def test_healthz_is_503_until_the_model_is_warmed(exported, monkeypatch):
    gate = threading.Event()
    load = ModelService._load_and_warm

    def held(self):
        gate.wait(30)
        load(self)

    monkeypatch.setattr(ModelService, "_load_and_warm", held)
    from engine.serving.model import ServeConfig

    srv = ThreadServer(ServeConfig(str(exported("mlp") / "export"))).start(ready=False)
    try:
        r = _get_when_listening(f"{srv.url}/healthz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert r.headers["retry-after"] == "1"
        r = httpx.post(f"{srv.url}/v1/decode", content=npy(np.zeros((1, 8), np.float32)),
                       headers=NPY)
        assert r.status_code == 503 and "not ready" in r.json()["error"]
        gate.set()
        health = wait_ready(srv.url)
        assert health["model"]["latent_shape"] == [8] and health["model"]["family"] == "mlp"
        assert health["runtime"]["backend"] == "onnxruntime"
        assert health["runtime"]["device"] == "cpu"
    finally:
        gate.set()
        srv.stop()


def _get_when_listening(url: str) -> httpx.Response:
    for _ in range(200):
        try:
            return httpx.get(url, timeout=5)
        except httpx.TransportError:
            threading.Event().wait(0.05)
    raise TimeoutError(url)


def test_conditional_labels_from_query_header_or_npz(server, exported):
    srv = server("cvae-mlp")
    reference = Sampler.load(exported("cvae-mlp") / "export", device="cpu")
    rng = np.random.default_rng(random.randrange(2**31))
    z = rng.standard_normal((3, 8)).astype(np.float32)
    y = rng.integers(0, 10, 3)
    want = reference.decode(torch.from_numpy(z), torch.from_numpy(y)).numpy()
    labels = ",".join(map(str, y))
    by_query = httpx.post(f"{srv.url}/v1/decode?labels={labels}", content=npy(z), headers=NPY)
    by_header = httpx.post(f"{srv.url}/v1/decode", content=npy(z),
                           headers={**NPY, "X-Labels": labels})
    by_npz = httpx.post(f"{srv.url}/v1/decode", content=npz(z=z, labels=y),
                        headers={"Content-Type": "application/x-npz"})
    for r in (by_query, by_header, by_npz):
        np.testing.assert_allclose(load_npy(r), want, rtol=0, atol=2e-6)
    one = httpx.post(f"{srv.url}/v1/decode?labels={y[0]}", content=npy(z), headers=NPY)
    want_one = reference.decode(torch.from_numpy(z), int(y[0])).numpy()
    np.testing.assert_allclose(load_npy(one), want_one, rtol=0, atol=2e-6)


def test_encode_returns_the_posterior_means(server, exported):
    srv = server("mlp")
    reference = Sampler.load(exported("mlp") / "export", device="cpu")
    x = np.random.default_rng(random.randrange(2**31)).random((4, 1, 28, 28), np.float32)
    mu, logvar = reference.encode(torch.from_numpy(x))
    got = load_npy(httpx.post(f"{srv.url}/v1/encode", content=npy(x), headers=NPY))
    np.testing.assert_allclose(got, mu.numpy(), rtol=0, atol=2e-5)
    both = httpx.post(f"{srv.url}/v1/encode", content=npy(x),
                      headers={**NPY, "Accept": "application/x-npz"})
    arrays = np.load(io.BytesIO(both.content), allow_pickle=False)
    np.testing.assert_allclose(arrays["logvar"], logvar.numpy(), rtol=0, atol=2e-5)


def test_sample_matches_the_sampler_for_a_seed_and_draws_a_png(server, exported):
    srv = server("cvae-mlp")
    reference = Sampler.load(exported("cvae-mlp") / "export", device="cpu")
    seed = random.randrange(2**31)
    r = httpx.post(f"{srv.url}/v1/sample", json={"n": 6, "seed": seed, "labels": 4,
                                                 "format": "npy"})
    want = reference.sample(6, seed=seed, labels=4).numpy()
    np.testing.assert_allclose(load_npy(r), want, rtol=0, atol=2e-6)
    assert r.headers["x-seed"] == str(seed)
    png = httpx.post(f"{srv.url}/v1/sample", json={"n": 6, "labels": [0, 1, 2, 3, 4, 5],
                                                   "nrow": 3})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    from PIL import Image

    image = Image.open(io.BytesIO(png.content))
    assert image.size == (2 + 3 * 30, 2 + 2 * 30)  # 3 x 2 tiles of 28 px, 2 px padding


def test_decode_png_is_the_grid_of_the_decoded_images(server, exported):
    srv = server("mlp")
    z = np.random.default_rng(random.randrange(2**31)).standard_normal((1, 8)).astype(np.float32)
    images = load_npy(httpx.post(f"{srv.url}/v1/decode", content=npy(z), headers=NPY))
    r = httpx.post(f"{srv.url}/v1/decode", content=npy(z), headers={**NPY, "Accept": "image/png"})
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(r.content)))[2:30, 2:30]
    expected = np.clip(images[0, 0] * 255 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(pixels, expected)


def test_vq_codes_and_crystal_heads(server, exported):
    """Integer codes in, images out; a crystal's latent + mask in as .npz, its four heads out
    as .npz (and no PNG: its outputs are not images)."""
    vq = server("vqvae")
    ref = Sampler.load(exported("vqvae") / "export", device="cpu")
    codes = ref.latents(2, seed=random.randrange(2**31)).numpy()
    got = load_npy(httpx.post(f"{vq.url}/v1/decode", content=npy(codes), headers=NPY))
    np.testing.assert_allclose(got, ref.decode(torch.from_numpy(codes)).numpy(), atol=2e-6)

    crystal = server("crystal")
    ref = Sampler.load(exported("crystal") / "export", device="cpu")
    z = ref.latents(2, seed=random.randrange(2**31))
    n_atoms = z.shape[1]
    mask = torch.arange(n_atoms)[None] < torch.tensor([[3], [n_atoms]])
    r = httpx.post(f"{crystal.url}/v1/decode", content=npz(z=z.numpy(), mask=mask.numpy()),
                   headers={"Content-Type": "application/x-npz"})
    assert r.status_code == 200, r.text
    heads = np.load(io.BytesIO(r.content), allow_pickle=False)
    want = ref.decode(z, mask=mask)
    assert list(heads.keys()) == list(ref.spec.output_names)
    for name, w in zip(ref.spec.output_names, want):
        np.testing.assert_allclose(heads[name], w.numpy(), rtol=0, atol=2e-5)
    png = httpx.post(f"{crystal.url}/v1/decode", content=npz(z=z.numpy(), mask=mask.numpy()),
                     headers={"Content-Type": "application/x-npz", "Accept": "image/png"})
    assert png.status_code == 400 and "not images" in png.json()["error"]
    sample = httpx.post(f"{crystal.url}/v1/sample", json={"n": 2})
    assert sample.status_code == 400 and "not images" in sample.json()["error"]


def test_a_failing_request_does_not_fail_its_batch_mates(exported, monkeypatch):
    """A row that passes the checks but breaks the model (here: a poisoned latent value) fails
    only its own request: the batch is rerun one request at a time."""
    from engine.serving.model import ServeConfig

    decode = ModelService._decode
    poison = np.float32(7.25)

    def fragile(self, inputs):
        if (inputs[0] == poison).any():
            raise RuntimeError("poisoned row")
        return decode(self, inputs)

    monkeypatch.setattr(ModelService, "_decode", fragile)
    srv = ThreadServer(ServeConfig(str(exported("mlp") / "export"), max_batch=32,
                                   max_delay_ms=50.0)).start()
    try:
        rng = np.random.default_rng(random.randrange(2**31))
        latents = [rng.standard_normal((1, 8)).astype(np.float32) for _ in range(12)]
        latents[5][0, 3] = poison

        async def fire():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
                return await asyncio.gather(*(client.post("/v1/decode", content=npy(z),
                                                          headers=NPY) for z in latents))

        replies = asyncio.run(fire())
        assert [r.status_code for r in replies] == [200] * 5 + [500] + [200] * 6
        assert "poisoned row" in replies[5].json()["error"]
        assert wait_ready(srv.url)["status"] == "ok"
    finally:
        srv.stop()


@pytest.mark.parametrize("settings", [{"max_batch": 1, "max_delay_ms": 0.0}])
def test_batching_off_still_answers_every_request(server, settings):
    srv = server("conv", **settings)
    rng = np.random.default_rng(random.randrange(2**31))
    latents = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(8)]

    async def fire():
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v1/decode", content=npy(z), headers=NPY)
                                          for z in latents))

    assert all(load_npy(r).shape == (1, 1, 28, 28) for r in asyncio.run(fire()))
    text = httpx.get(f"{srv.url}/metrics").text
    count = metric(text, "vae_serve_batch_rows_count", op="decode")
    assert metric(text, "vae_serve_batch_rows_bucket", op="decode", le="1.0") == count
