"""Load test of `python -m engine.serve`: dynamic batching on vs off, 1 / 8 / 64 clients.

    python benchmarks/serve_load.py              # full: 3 repetitions, docs/results/serve_load.*
    python benchmarks/serve_load.py --quick      # 1 repetition, fewer requests (~1 min)

Builds the MLP and Conv decoders of the presets (mlp-mnist, conv-mnist) with random weights
(speed does not depend on the values), exports their decoders to ONNX, and for each decoder
and mode starts the server as a subprocess on a free 127.0.0.1 port:
    batching   --max-batch 64 --max-delay-ms 2
    none       --max-batch 1  --max-delay-ms 0   (every request is its own model call)
both with --threads 1 (ONNX Runtime intra-op threads: one core for the model thread, the other
for the event loop and this client; two intra-op threads on two shared cores oversubscribe).
C concurrent clients (asyncio tasks, one keep-alive connection each: `Connection`, a minimal
HTTP/1.1 client, because httpx's own cost at 64 connections swamps these two cores) each send
one-row decode requests back to back, until --requests requests are answered or --seconds pass;
a warm-up of 2 C requests comes first. Reported per (decoder, mode, C), medians over
--reps repetitions: throughput (requests/s), client-side p50 / p99 latency, and the mean batch
size (rows per model call, from the server's /metrics over the measured window).
Goal: at 64 clients, batching gives >= 3x the throughput of no batching for the Conv decoder,
with a p99 no worse. Bounded in requests and time; talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = {"mlp": ("mlp", "mlp-mnist"), "conv": ("conv", "conv-mnist")}
MODES = {"batching": ("--max-batch", "64", "--max-delay-ms", "2"),
         "none": ("--max-batch", "1", "--max-delay-ms", "0")}
CLIENTS = (1, 8, 64)


def export_decoders(root: Path) -> dict[str, Path]:
    """subject -> decoder.onnx of a randomly initialised preset model."""
    import torch

    from engine.checkpoint import save
    from engine.models import build_model
    from export.onnx import export_onnx

    out = {}
    for subject, (family, preset) in SUBJECTS.items():
        torch.manual_seed(0)
        run = root / subject
        save(run / "last", build_model(family, preset=preset).eval())
        out[subject] = export_onnx(run, parts="decoder", batches=(1, 7))["decoder"]
    return out


def start_server(artifact: Path, mode: str, threads: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "engine.serve", str(artifact), "--port", "0", "--threads",
           str(threads), *MODES[mode]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
    found = re.search(r"http://127\.0\.0\.1:(\d+)/", proc.stdout.readline())
    if not found:
        proc.kill()
        raise RuntimeError(f"the server did not start: {' '.join(cmd)}")
    url = f"http://127.0.0.1:{found.group(1)}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{url} was not ready within 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def batch_rows(metrics_text: str) -> np.ndarray:
    """(rows, calls) of the decode model calls so far, from a /metrics exposition."""
    values = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name.startswith("vae_serve_batch_rows_") and s.labels.get("op") == "decode":
                values[s.name] = s.value
    return np.array([values.get("vae_serve_batch_rows_sum", 0.0),
                     values.get("vae_serve_batch_rows_count", 0.0)])


class Connection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: a request is one write and a
    read of the status line, headers and Content-Length body. httpx.AsyncClient costs far more
    per request at 64 connections (its pool is scanned per request: 63 req/s against 471 with
    this client, same server, measured here), so it would measure the client, not the server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        return status, await self.reader.readexactly(int(length.group(1)) if length else 0)

    def close(self) -> None:
        self.writer.close()


def http_request(method: str, path: str, body: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-npy"
            f"\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def drive(url: str, body: bytes, clients: int, requests: int, seconds: float) -> dict:
    """`requests` one-row decodes (or `seconds`) from `clients` connections, after a warm-up
    of two requests per connection; the mean batch size from /metrics over the window."""
    port = int(url.rsplit(":", 1)[1])
    decode, metrics = http_request("POST", "/v1/decode", body), http_request("GET", "/metrics")
    conns = [await Connection.open(port) for _ in range(clients)]

    async def one(conn: Connection) -> float:
        start = time.perf_counter()
        status, reply = await conn.request(decode)
        if status != 200:
            raise RuntimeError(f"decode answered {status}: {reply[:200]!r}")
        return time.perf_counter() - start

    async def warm(conn: Connection) -> None:
        for _ in range(2):
            await one(conn)

    await asyncio.gather(*(warm(c) for c in conns))
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    remaining = [requests]

    async def worker(conn: Connection) -> None:
        while remaining[0] > 0 and time.perf_counter() < deadline:
            remaining[0] -= 1
            latencies.append(await one(conn))

    before = batch_rows((await conns[0].request(metrics))[1].decode())
    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    wall = time.perf_counter() - start
    rows, calls = batch_rows((await conns[0].request(metrics))[1].decode()) - before
    for c in conns:
        c.close()
    ms = np.array(latencies) * 1e3
    return {"requests": len(latencies), "seconds": wall, "throughput": len(latencies) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_batch": float(rows / max(calls, 1))}


def model_ceiling(path: Path, latent: int, threads: int, reps: int = 5) -> dict:
    """The decoder alone (Sampler.decode, same --threads), batch 1 vs 64 per row: what
    batching gains inside the model. The server gains that on the model's time plus, per
    batch instead of per request, the hand-off to the model thread; the HTTP work stays per
    request either way."""
    import torch

    from engine.runtime import Sampler

    sampler = Sampler.load(path, device="cpu", threads=threads)
    per_row = {}
    for batch in (1, 64):
        z = torch.randn(batch, latent)
        calls = max(1, 256 // batch)
        for _ in range(3):
            sampler.decode(z)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(calls):
                sampler.decode(z)
            times.append((time.perf_counter() - start) / (calls * batch))
        per_row[batch] = statistics.median(times)
    return {"us_per_row_b1": per_row[1] * 1e6, "us_per_row_b64": per_row[64] * 1e6,
            "ratio": per_row[1] / per_row[64]}


def npy_body(latent: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).standard_normal((1, latent)).astype(np.float32))
    return buf.getvalue()


def run(args: argparse.Namespace) -> dict:
    """Per decoder: for each repetition, both modes back to back (their order alternating),
    each on a fresh server, so that paired figures share the machine's load of the moment."""
    results, ceilings, ratios = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        decoders = export_decoders(Path(tmp))
        latent = {"mlp": 20, "conv": 128}
        for subject, path in decoders.items():
            ceilings[subject] = model_ceiling(path, latent[subject], args.threads)
            body = npy_body(latent[subject])
            reps = {(m, c): [] for m in MODES for c in CLIENTS}
            for rep in range(args.reps):
                for mode in list(MODES)[::1 if rep % 2 == 0 else -1]:
                    proc, url = start_server(path, mode, args.threads)
                    try:
                        for c in CLIENTS:
                            reps[mode, c].append(asyncio.run(drive(url, body, c, args.requests,
                                                                   args.seconds)))
                            print(f"{subject:5s} {mode:8s} C={c:3d}: "
                                  f"{reps[mode, c][-1]['throughput']:8.0f} req/s", flush=True)
                    finally:
                        stop_server(proc)
            results += [summarize(subject, m, c, reps[m, c]) for m in MODES for c in CLIENTS]
            ratios[subject] = [a["throughput"] / b["throughput"] for a, b in
                               zip(reps["batching", 64], reps["none", 64])]
    return {"meta": meta(args), "results": results, "model_only": ceilings,
            "paired_ratios_64_clients": ratios, "goal": goal(results, ratios["conv"])}


def summarize(subject: str, mode: str, clients: int, reps: list[dict]) -> dict:
    med = lambda key: statistics.median(r[key] for r in reps)
    return {"decoder": subject, "mode": mode, "clients": clients,
            "throughput": med("throughput"), "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"),
            "mean_batch": med("mean_batch"), "reps": reps}


def goal(results: list[dict], conv_pairs: list[float]) -> dict:
    pick = {(r["decoder"], r["mode"], r["clients"]): r for r in results}
    on, off = pick[("conv", "batching", 64)], pick[("conv", "none", 64)]
    ratio = statistics.median(conv_pairs)  # the median of per-repetition (paired) ratios
    return {"conv_64_clients_throughput_ratio": ratio, "target_ratio": 3.0,
            "p99_batching_ms": on["p99_ms"], "p99_none_ms": off["p99_ms"],
            "met": ratio >= 3.0 and on["p99_ms"] <= off["p99_ms"]}


def meta(args: argparse.Namespace) -> dict:
    import onnxruntime
    import starlette
    import torch
    import uvicorn

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True).stdout.strip()
    return {"cpu": f"{platform.processor() or platform.machine()} x{os.cpu_count()}",
            "load_average": os.getloadavg(), "commit": commit, "threads": args.threads,
            "requests": args.requests, "seconds": args.seconds, "reps": args.reps,
            "modes": {k: " ".join(v) for k, v in MODES.items()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "onnxruntime": onnxruntime.__version__, "uvicorn": uvicorn.__version__,
                         "starlette": starlette.__version__, "httpx": httpx.__version__}}


def table(report: dict) -> str:
    rows = ["| decoder | mode | clients | req/s | p50 ms | p99 ms | mean batch |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        rows.append(f"| {r['decoder']} | {r['mode']} | {r['clients']} | {r['throughput']:.0f} |"
                    f" {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['mean_batch']:.1f} |")
    g = report["goal"]
    ratio = g["conv_64_clients_throughput_ratio"]
    pairs = ", ".join(f"{r:.2f}" for r in report["paired_ratios_64_clients"]["conv"])
    rows.append(f"\nConv, 64 clients: batching / none = {ratio:.2f}x throughput, the median of"
                f" the repetitions' paired ratios ({pairs}; goal >= 3x);"
                f" p99 {g['p99_batching_ms']:.1f} ms vs"
                f" {g['p99_none_ms']:.1f} ms; goal met: {g['met']}")
    for subject, c in report["model_only"].items():
        rows.append(f"\n{subject} decoder alone (Sampler.decode, --threads"
                    f" {report['meta']['threads']}): {c['us_per_row_b1']:.1f} us/row at batch 1,"
                    f" {c['us_per_row_b64']:.1f} at batch 64: {c['ratio']:.2f}x less time per"
                    " row from batching inside the decoder itself")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition, 400 requests, 10 s cap")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--requests", type=int, default=3000, help="per (decoder, mode, clients)")
    ap.add_argument("--seconds", type=float, default=20.0, help="time cap per measurement")
    ap.add_argument("--threads", type=int, default=1, help="the server's --threads")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "serve_load"),
                    help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.requests, args.seconds = 1, 400, 10.0
    report = run(args)
    text = table(report)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
