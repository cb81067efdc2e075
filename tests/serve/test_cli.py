"""`python -m engine.serve` as a process: SIGTERM drains the requests in flight (all 200),
then the process exits 0; a bad artifact or flag ends with a one-line error and exit code 2."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import numpy as np

from engine import serve
from tests.serve.conftest import cli_server, wait_ready
from tests.serve.test_server import NPY, load_npy, npy


def test_sigterm_drains_in_flight_requests_then_exits_0(exported):
    delay_s = 1.5  # requests wait this long for batch-mates: they are in flight at SIGTERM
    proc, url = cli_server(exported("mlp") / "export", "--max-delay-ms", str(delay_s * 1000),
                           "--max-batch", "64", "--threads", "1")
    try:
        wait_ready(url, proc=proc)
        rng = np.random.default_rng()
        latents = [rng.standard_normal((1, 8)).astype(np.float32) for _ in range(6)]

        async def fire_then_terminate():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                sent = [asyncio.ensure_future(client.post("/v1/decode", content=npy(z),
                                                          headers=NPY)) for z in latents]
                await asyncio.sleep(0.5)  # all sent, none answered yet (they wait 1.5 s)
                assert not any(t.done() for t in sent)
                proc.send_signal(signal.SIGTERM)
                start = time.monotonic()
                replies = await asyncio.gather(*sent)
                return replies, time.monotonic() - start

        replies, waited = asyncio.run(fire_then_terminate())
        assert [r.status_code for r in replies] == [200] * len(latents)
        assert all(load_npy(r).shape == (1, 1, 28, 28) for r in replies)
        assert proc.wait(timeout=30) == 0
        assert waited < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        httpx.get(f"{url}/healthz", timeout=2)
        raise AssertionError("the server still answers after exiting")
    except httpx.TransportError:
        pass


def test_a_missing_artifact_is_a_one_line_error(tmp_path, capsys):
    assert serve.main([str(tmp_path / "nope.onnx"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope.onnx does not exist" in err and "\n" not in err
    assert serve.main([str(tmp_path), "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err

