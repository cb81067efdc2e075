"""Serve a VAE over HTTP with dynamic batching: `python -m engine.serve ARTIFACT`.

    python -m engine.serve runs/mnist/export                     # http://127.0.0.1:8000/
    python -m engine.serve runs/mnist/export/decoder.onnx --max-batch 64 --max-delay-ms 2
    python -m engine.serve runs/cvae --backend eager --port 0    # a free port, printed
    curl -s localhost:8000/healthz
    curl -s -X POST localhost:8000/v1/sample -d '{"n": 16, "seed": 0}' -o grid.png

ARTIFACT is anything `engine.runtime.Sampler.load` opens: an .onnx / .engine / .pt2 file, an
export directory (manifest.json) or a checkpoint / run directory. Concurrent requests are
gathered into batches of up to --max-batch rows, waiting at most --max-delay-ms for more, and
run on one dedicated model thread; --max-batch 1 turns batching off. The endpoints, body
formats and status codes are in engine/serving/app.py and docs/serving.md; GET / is the latent
explorer. SIGTERM (or Ctrl-C) stops accepting connections, finishes the requests in flight,
then exits 0. Binds to 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from engine.runtime import InputError, SamplerError, resolve
from engine.runtime.checks import check_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("artifact", help="export dir, .onnx/.engine/.pt2 file, or checkpoint/run dir")
    a("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine)")
    a("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    a("--max-batch", type=int, default=64, help="most rows per model call (1: no batching)")
    a("--max-delay-ms", type=float, default=2.0,
      help="longest wait for more rows once a request is queued (default 2)")
    a("--max-queue", type=int, default=1024,
      help="requests waiting for a batch before new ones get 503 (default 1024)")
    a("--max-body-mb", type=float, default=64.0, help="largest request body (default 64 MiB)")
    a("--max-sample", type=int, default=256, help="largest n of POST /v1/sample")
    a("--backend", default=None,
      help="onnxruntime, tensorrt, aoti, eager or compile (default: from the artifact)")
    a("--device", default=None, help="cpu or cuda (default: the backend's choice)")
    a("--compile", action="store_true", help="torch.compile (eager backend)")
    a("--threads", type=int, default=None,
      help="ONNX Runtime intra-op threads and torch threads of the model (default: all cores)")
    a("--drain-timeout", type=float, default=30.0,
      help="seconds to finish in-flight requests after SIGTERM (default 30)")
    a("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_batch < 1 or args.max_queue < 1 or args.max_delay_ms < 0 or args.max_sample < 1 \
            or args.max_body_mb <= 0 or not 0 <= args.port < 65536 \
            or (args.threads is not None and args.threads < 1):
        print("error: --max-batch, --max-queue, --max-sample and --threads must be >= 1,"
              " --max-delay-ms >= 0, --max-body-mb > 0 and --port in [0, 65535]", file=sys.stderr)
        return 2
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:  # the artifact is only loaded once the server is up: refuse a bad path right away
        check_device(args.device, "--device")
        if not Path(args.artifact).exists():
            raise SamplerError(f"{args.artifact} does not exist; pass an export directory, an"
                               " .onnx/.engine/.pt2 file or a checkpoint/run directory")
        resolve(args.artifact, None if args.backend == "compile" else args.backend, args.device)
    except (SamplerError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The serve extra (starlette, uvicorn, prometheus-client) is imported only by this command.
    from engine.serving.app import serve
    from engine.serving.model import ServeConfig

    config = ServeConfig(args.artifact, args.backend, args.device, args.compile, args.threads,
                         args.max_batch, args.max_delay_ms, args.max_queue,
                         int(args.max_body_mb * (1 << 20)), args.max_sample)
    return serve(config, args.host, args.port, args.access_log, args.drain_timeout)


if __name__ == "__main__":
    sys.exit(main())
