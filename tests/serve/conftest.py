"""Fixtures of the serving tests: small exported models (random weights) and real servers.

`server(family, **settings)` starts the real app under uvicorn in a thread of the test
process, on a free loopback port, and waits until GET /healthz says it is ready; servers are
shared per (family, settings) for the session. `cli_server(...)` starts `python -m
engine.serve` as a subprocess (for signals); the caller stops it.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn, starlette) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (dev extra) drives the server")

import uvicorn  # noqa: E402

from engine.serving.app import bind, create_app  # noqa: E402
from engine.serving.model import ServeConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# family -> (registry family, preset, overrides, exported parts): small, so exports stay quick.
FAMILIES = {
    "mlp": ("mlp", "mlp-mnist", {"hidden_dims": (64,), "latent_dim": 8}, "decoder,encoder"),
    "cvae-mlp": ("cvae-mlp", "cvae-mlp-mnist", {"hidden_dims": (64,), "latent_dim": 8},
                 "decoder"),
    "conv": ("conv", "conv-small", {}, "decoder"),
    "vqvae": ("vqvae", "vqvae-small", {}, "decoder"),
    "crystal": ("crystal", "crystal-small", {"d_model": 32, "num_layers": 1, "max_atoms": 6},
                "decoder"),
}


def export_family(root: Path, family: str, seed: int = 0) -> Path:
    """A run directory with last/ (random weights) and export/ (ONNX of the listed parts)."""
    from engine.checkpoint import save
    from engine.models import build_model
    from export.onnx import export_onnx

    name, preset, overrides, parts = FAMILIES[family]
    torch.manual_seed(seed)
    run = root / family
    save(run / "last", build_model(name, preset=preset, **overrides).eval())
    export_onnx(run, parts=parts, batches=(1, 3))
    return run


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """family -> run dir holding export/ (built once per session)."""
    root = tmp_path_factory.mktemp("serve-runs")
    return functools.cache(lambda family: export_family(root, family))


class ThreadServer:
    """The real app under uvicorn, in a thread, on 127.0.0.1:<free port>."""

    def __init__(self, config: ServeConfig) -> None:
        self.app = create_app(config)
        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        uv = uvicorn.Config(self.app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(uv)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    @property
    def service(self):
        return self.app.state.service

    def start(self, ready: bool = True) -> ThreadServer:
        self.thread.start()
        if ready:
            wait_ready(self.url)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def wait_ready(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> dict:
    """Poll GET /healthz until 200; its JSON."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            r = httpx.get(f"{url}/healthz", timeout=5)
            if r.status_code == 200:
                return r.json()
            if r.json().get("status") == "failed":
                raise RuntimeError(f"the model did not load: {r.json()['error']}")
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} was not ready within {timeout} s")


@pytest.fixture(scope="session")
def server(exported):
    """(family, **settings) -> a ready ThreadServer, shared per arguments."""
    started: dict[tuple, ThreadServer] = {}

    def get(family: str, **settings) -> ThreadServer:
        key = (family, tuple(sorted(settings.items())))
        if key not in started:
            config = ServeConfig(str(exported(family) / "export"), **settings)
            started[key] = ThreadServer(config).start()
        return started[key]

    yield get
    for s in started.values():
        s.stop()


def cli_server(artifact: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`python -m engine.serve ARTIFACT --port 0 FLAGS` and its URL, read from its banner."""
    proc = subprocess.Popen([sys.executable, "-m", "engine.serve", str(artifact), "--port", "0",
                             *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not found:
        proc.kill()
        raise RuntimeError(f"no banner from the server: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, f"http://127.0.0.1:{found.group(1)}"
