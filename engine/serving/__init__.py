"""The HTTP server behind `python -m engine.serve` (docs/serving.md).

    app.py       the Starlette routes, error replies and the uvicorn runner
    batcher.py   DynamicBatcher: rows of concurrent requests -> one model call
    model.py     ModelService: the Sampler on its own thread, warm-up, per-request checks
    codec.py     .npy / .npz / JSON bodies (byte limits, no unpickling) and PNG grids
    metrics.py   the Prometheus registry
    explorer.py  the latent explorer's slider ranking; static/ holds the page itself

Needs the `serve` extra (starlette, uvicorn, prometheus-client); only the serve command and
its tests import this package. Import the submodules directly (this file re-exports nothing).
"""
