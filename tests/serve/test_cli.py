"""`python -m engine.serve` as a process: SIGTERM drains the requests in flight (all 200),
then the process exits 0; a bad artifact or flag ends with a one-line error and exit code 2."""

from __future__ import annotations

import io
import signal
import socket
import time

import numpy as np
import pytest
import torch

from engine import serve
from engine.runtime import Sampler
from tests.serve.conftest import cli_server, wait_ready
from tests.serve.test_server import npy


def test_sigterm_drains_in_flight_requests_then_exits_0(exported):
    """Six requests are in flight when SIGTERM arrives (headers and half of each body sent);
    their bodies finish after the signal, and each still gets its 200 before the process
    exits 0. A new connection after SIGTERM is refused."""
    proc, url = cli_server(exported("mlp") / "export", "--max-delay-ms", "1000", "--threads", "1")
    port = int(url.rsplit(":", 1)[1])
    try:
        wait_ready(url, proc=proc)
        rng = np.random.default_rng()
        latents = [rng.standard_normal((1, 8)).astype(np.float32) for _ in range(6)]
        bodies = [npy(z) for z in latents]
        conns = []
        for body in bodies:
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/decode HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy"
                      b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:len(body) // 2])
            conns.append(s)
        time.sleep(0.5)  # the server has every request's headers: they are in flight
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # no new connections while draining
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        for s, body in zip(conns, bodies):
            s.sendall(body[len(body) // 2:])
        replies = [_reply(s) for s in conns]
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reference = Sampler.load(exported("mlp") / "export", device="cpu")
    for (status, payload), z in zip(replies, latents):
        assert status == 200
        got = np.load(io.BytesIO(payload), allow_pickle=False)
        np.testing.assert_allclose(got, reference.decode(torch.from_numpy(z)).numpy(), atol=2e-6)


def _reply(s: socket.socket) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 reply with a Content-Length."""
    s.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(65536)
    s.close()
    return int(head.split(b" ")[1]), body


def test_a_missing_artifact_is_a_one_line_error(tmp_path, capsys):
    assert serve.main([str(tmp_path / "nope.onnx"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope.onnx does not exist" in err and "\n" not in err
    assert serve.main([str(tmp_path), "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err

