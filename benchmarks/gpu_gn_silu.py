"""GroupNorm + SiLU on a GPU at the shapes of a Stable-Diffusion VAE decoder.

    PYTHONPATH=. python benchmarks/gpu_gn_silu.py --out DIR                       # H100 / H200
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/gpu_gn_silu.py --out DIR --device cpu --small

For x of (1, 512, 128, 128), (1, 256, 256, 256) and (1, 128, 512, 512) with 32 groups, in fp16 and
bf16, NCHW and channels-last, one run:
  1. checks the Triton op's y, dx, dgamma and dbeta against float64 autograd of the reference:
     error <= 2 x eager's error in the same dtype + the tests' floor (tests/conftest.py);
  2. times forward and forward+backward (upstream gradient of ones) for eager
     (F.group_norm + F.silu), compile (torch.compile of that) and triton (kernels.group_norm_silu),
     CUDA events, L2 flushed before each call, the median of --reps calls;
  3. reports GB/s from the compulsory traffic (forward: read x, write y, 2 bytes-per-element x s;
     forward+backward: + read dy and x, write dx, 5s in all; the kernels' second read of x is not
     counted), the fraction of the device-to-device copy bandwidth measured in the same run, the
     speed-up over eager, and the kernel's launch plan (programs per group).
It writes DIR/gpu_gn_silu.json and DIR/gpu_gn_silu.md.
"""

from __future__ import annotations

import json
from typing import Any

import torch

import kernels
from benchmarks.gpu_kernels import (
    OPS,
    PROVIDERS,
    SHORT,
    copy_bandwidth,
    environment,
    gn_bytes,
    make_call,
    report_parser,
    time_ms,
)
from kernels import _groups

SPEC = OPS["group_norm_silu"]
SHAPES_GPU = [(1, 512, 128, 128), (1, 256, 256, 256), (1, 128, 512, 512)]
SHAPES_SMALL = [(1, 64, 8, 8), (1, 32, 12, 12)]
GROUPS = 32
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # tests/conftest.py


def _sizes(shape: tuple[int, ...], channels_last: bool) -> dict[str, int]:
    n, c, h, w = shape
    return {"N": n, "C": c, "H": h, "W": w, "G": GROUPS, "CL": int(channels_last)}


def _outputs(fn: Any, args: tuple[Any, ...], dy: torch.Tensor, dtype: torch.dtype | None
             ) -> list[torch.Tensor]:  # fmt: skip
    """[y, dx, dgamma, dbeta] of fn on copies of args (cast to dtype if given)."""
    x, groups, weight, bias = (a.detach().to(dtype or a.dtype).requires_grad_()
                               if isinstance(a, torch.Tensor) else a for a in args)  # fmt: skip
    y = fn(x, groups, weight, bias)
    return [y.detach(), *torch.autograd.grad(y, (x, weight, bias), dy.to(y.dtype))]


def check(sizes: dict[str, int], dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """Errors of the Triton op and of eager against float64, and whether the rule holds."""
    args = SPEC.make(sizes, dtype, device)
    dy = torch.randn_like(args[0], dtype=torch.float32)
    with kernels.use_backend("triton"):
        actual = _outputs(SPEC.triton, args, dy, None)
    expected = _outputs(SPEC.ref, args, dy, torch.float64)
    eager = _outputs(SPEC.ref, args, dy, None)
    row: dict[str, Any] = {"ok": True}
    for name, a, e, g in zip(("y", "dx", "dgamma", "dbeta"), actual, expected, eager):
        err = (a.double() - e).abs().max().item()
        eager_err = (g.double() - e).abs().max().item()
        bound = 2 * eager_err + FLOOR[dtype] * max(1.0, e.abs().max().item())
        row[name] = {"error": err, "eager_error": eager_err, "bound": bound}
        row["ok"] = row["ok"] and err <= bound
    row["same_layout"] = actual[0].stride() == args[0].stride()
    return row


def run(device: torch.device, shapes: list[tuple[int, ...]], dtypes: list[torch.dtype],
        providers: list[str], copy_gbs: float, reps: int) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for shape in shapes:
        for channels_last in (False, True):
            sizes = _sizes(shape, channels_last)
            plan = _groups.launch_params(shape[0] * GROUPS, shape[1] // GROUPS,
                                         shape[2] * shape[3], device)  # fmt: skip
            for dtype in dtypes:
                base = {"shape": list(shape), "layout": "nhwc" if channels_last else "nchw",
                        "dtype": SHORT[dtype], "splits": plan.splits}  # fmt: skip
                rows.append({**base, "check": check(sizes, dtype, device)})
                print(json.dumps(rows[-1]), flush=True)
                rows += _time(sizes, dtype, device, providers, copy_gbs, reps, base)
    return rows


def _time(sizes: dict[str, int], dtype: torch.dtype, device: torch.device, providers: list[str],
          copy_gbs: float, reps: int, base: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    rows, args = [], SPEC.make(sizes, dtype, device)
    item = torch.finfo(dtype).bits // 8
    for mode in ("fwd", "fwdbwd"):
        eager_ms = None
        for provider in providers:
            torch._dynamo.reset()  # a fresh compile per shape / dtype / layout: no recompile cap
            ms = time_ms(make_call(SPEC, provider, args, mode), device, reps=reps)
            eager_ms = ms if provider == "eager" else eager_ms
            gbs = gn_bytes(sizes, item, mode) / (ms * 1e-3) / 1e9
            rows.append({**base, "mode": mode, "provider": provider, "ms": ms, "GB/s": gbs,
                         "fraction_of_copy_bw": gbs / copy_gbs,
                         "speedup_vs_eager": eager_ms / ms if eager_ms else None})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# GroupNorm + SiLU on {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}; device-to-device copy "
             f"{report['copy_GBps']:.0f} GB/s (read + write), measured in this run. "
             f"{GROUPS} groups; GB/s from compulsory traffic (2s fwd, 5s fwd+bwd).", "",
             "| shape | layout | dtype | splits | mode | provider | ms | GB/s | of copy BW | "
             "vs eager |", "|---|---|---|---:|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in report["rows"]:
        head = f"| {tuple(r['shape'])} | {r['layout']} | {r['dtype']} | {r['splits']} |"
        if "check" in r:
            lines.append(f"{head} check | | {'ok' if r['check']['ok'] else 'FAILED'} | | | |")
            continue
        speedup = "" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
        lines.append(f"{head} {r['mode']} | {r['provider']} | {r['ms']:.4f} | {r['GB/s']:.0f} | "
                     f"{r['fraction_of_copy_bw']:.2f} | {speedup} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = report_parser(__doc__)
    args = p.parse_args(argv)
    providers = [name for name in PROVIDERS if name in args.providers.split(",")]  # eager first
    if sorted(set(args.providers.split(",")) - set(PROVIDERS)) or "eager" not in providers:
        p.error(f"--providers: expected a subset of {', '.join(PROVIDERS)} including eager")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device is visible: run on a GPU machine, or pass --device cpu --small")
    torch.manual_seed(0)
    dtypes = [torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    copy_gbs = copy_bandwidth(device, args.small)
    shapes = SHAPES_SMALL if args.small else SHAPES_GPU
    report = {"environment": environment(device), "copy_GBps": copy_gbs,
              "rows": run(device, shapes, dtypes, providers, copy_gbs, args.reps)}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_gn_silu.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_gn_silu.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(r["check"]["ok"] for r in report["rows"] if "check" in r) else 1


if __name__ == "__main__":
    raise SystemExit(main())
