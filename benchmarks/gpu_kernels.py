"""GPU check and timing of the fused kernels: correctness, fwd / fwd+bwd times, VQ search.

    PYTHONPATH=. python benchmarks/gpu_kernels.py --out DIR            # on a CUDA machine
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/gpu_kernels.py --out DIR --device cpu --small

One run does, on one device:
  1. correctness of every Triton op against a float64 reference (the rules of tests/kernels);
  2. the device-to-device copy bandwidth (bytes read + written per second), the ceiling for the
     memory-bound ops, measured in the same run;
  3. the median time of every op, forward and forward+backward, for three providers:
     eager (the PyTorch reference `<op>_ref`), compile (torch.compile of the reference) and
     triton (the public op with the Triton backend), with GB/s from the ideal traffic of
     docs/kernels.md and the fraction of the copy bandwidth;
  4. the nearest-code search at N=65536, K=4096, D=64: Triton `vq_nearest` against
     torch.cdist + argmin and the reference (||e||^2 - 2 x e^T, argmin), TFLOP/s (2*N*K*D per
     call) and peak memory above the inputs.
GroupNorm + SiLU is timed here at one SD-decoder shape (1, 512, 128, 128); the decoder's other
shapes, fp16 and channels-last are in benchmarks/gpu_gn_silu.py.
It writes DIR/gpu_kernels.json and DIR/gpu_kernels.md. Timing: CUDA events around each call,
L2 flushed (a 256 MiB memset) before each call, warm-up calls first, the median reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import kernels

PROVIDERS = ("eager", "compile", "triton")
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ----------------------------------------------------------------------------------------------
# Ops: inputs, calls and ideal memory traffic (bytes) / flops per call
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpSpec:
    name: str
    make: Callable[[dict[str, int], torch.dtype, torch.device], tuple[Any, ...]]
    triton: Callable[..., Any]  # the public op (dispatches to Triton inside use_backend)
    ref: Callable[..., Any]  # the PyTorch reference
    traffic: Callable[[dict[str, int], int, str], float]  # (sizes, itemsize, mode) -> bytes
    differentiable: bool = True


def _latent(sizes: dict[str, int], dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    mu = torch.randn(sizes["B"], sizes["D"], device=device).to(dtype)
    logvar = (0.5 * torch.randn(sizes["B"], sizes["D"], device=device)).to(dtype)
    return mu.requires_grad_(), logvar.requires_grad_()


def _vq(sizes: dict[str, int], dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    x = torch.randn(sizes["N"], sizes["D"], device=device).to(dtype)
    codebook = torch.randn(sizes["K"], sizes["D"], device=device).to(dtype)
    return x.requires_grad_(), codebook.requires_grad_()


def _ema(sizes: dict[str, int], dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    x = torch.randn(sizes["N"], sizes["D"], device=device).to(dtype)
    return x, torch.randint(0, sizes["K"], (sizes["N"],), device=device), sizes["K"]


def _gn(sizes: dict[str, int], dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    """x (N, C, H, W) (channels-last if sizes["CL"]), num_groups, gamma, beta."""
    x = torch.randn(sizes["N"], sizes["C"], sizes["H"], sizes["W"], device=device).to(dtype)
    x = x.to(memory_format=torch.channels_last) if sizes.get("CL") else x
    weight = (1 + 0.1 * torch.randn(sizes["C"], device=device)).to(dtype)
    bias = (0.1 * torch.randn(sizes["C"], device=device)).to(dtype)
    return x.requires_grad_(), sizes["G"], weight.requires_grad_(), bias.requires_grad_()


def gn_bytes(s: dict[str, int], item: int, mode: str) -> float:
    """Compulsory traffic: read x, write y (fwd); + read dy, x, write dx (bwd); 2s or 5s."""
    return s["N"] * s["C"] * s["H"] * s["W"] * item * (5 if mode == "fwdbwd" else 2)


def _n(s: dict[str, int]) -> int:
    return s["B"] * s["D"]


def _vq_bytes(s: dict[str, int], item: int, mode: str) -> float:
    nd = s["N"] * s["D"]
    fwd = 2 * nd * item + s["K"] * s["D"] * item + 8 * s["N"]  # x, q, codebook once, idx
    return fwd + (4 * nd * item + 4 * nd if mode == "fwdbwd" else 0)  # gq, x, e, dx; atomics


OPS: dict[str, OpSpec] = {
    "reparameterize": OpSpec(
        "reparameterize", _latent, kernels.reparameterize, kernels.reparameterize_ref,
        lambda s, i, m: _n(s) * i * (6 if m == "fwdbwd" else 3),
    ),
    "kl_divergence": OpSpec(
        "kl_divergence", _latent, kernels.kl_divergence, kernels.kl_divergence_ref,
        lambda s, i, m: _n(s) * i * (6 if m == "fwdbwd" else 2) + 4 * s["B"],
    ),
    "reparameterize_kl": OpSpec(
        "reparameterize_kl", _latent, kernels.reparameterize_kl, kernels.reparameterize_kl_ref,
        lambda s, i, m: _n(s) * i * (8 if m == "fwdbwd" else 3) + 4 * s["B"],
    ),
    "vq_quantize": OpSpec("vq_quantize", _vq, kernels.vq_quantize, kernels.vq_quantize_ref,
                          _vq_bytes),
    "vq_ema_update": OpSpec(
        "vq_ema_update", _ema, kernels.vq_ema_update, kernels.vq_ema_update_ref,
        lambda s, i, m: s["N"] * s["D"] * i + 8 * s["N"] + 4 * s["K"] * (s["D"] + 1),
        differentiable=False,
    ),
    "group_norm_silu": OpSpec("group_norm_silu", _gn, kernels.group_norm_silu,
                              kernels.group_norm_silu_ref, gn_bytes),
}  # fmt: skip

SIZES_GPU = {"latent": {"B": 16384, "D": 1024}, "vq": {"N": 65536, "K": 4096, "D": 64},
             "gn": {"N": 1, "C": 512, "H": 128, "W": 128, "G": 32}}  # SD decoder, batch 1
SIZES_SMALL = {"latent": {"B": 64, "D": 48}, "vq": {"N": 256, "K": 64, "D": 16},
               "gn": {"N": 2, "C": 16, "H": 12, "W": 10, "G": 4}}  # fmt: skip


def sizes_for(op: str, table: dict[str, dict[str, int]]) -> dict[str, int]:
    if op == "group_norm_silu":
        return table["gn"]
    return table["vq" if op.startswith("vq") else "latent"]


def flops(op: str, sizes: dict[str, int]) -> float:
    """Matrix-product flops per forward call (the distance search); 0 for elementwise ops."""
    return 2.0 * sizes["N"] * sizes["K"] * sizes["D"] if op == "vq_quantize" else 0.0


def _tensors(out: Any) -> list[torch.Tensor]:
    out = out if isinstance(out, tuple) else (out,)
    return [t for t in out if isinstance(t, torch.Tensor) and t.requires_grad]


def make_call(spec: OpSpec, provider: str, args: tuple[Any, ...], mode: str) -> Callable[[], Any]:
    """A no-argument call of one provider; fwdbwd also runs autograd with ones-like grads."""
    if provider == "triton":

        def fwd() -> Any:
            with kernels.use_backend("triton"):
                return spec.triton(*args)
    else:
        ref = torch.compile(spec.ref) if provider == "compile" else spec.ref

        def fwd() -> Any:
            return ref(*args)

    if mode == "fwd":
        return torch.no_grad()(fwd)  # the forward alone: no autograd graph is recorded
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def fwdbwd() -> Any:
        outs = _tensors(fwd())
        grads = [torch.ones_like(o) for o in outs]
        return torch.autograd.grad(outs, inputs, grads, allow_unused=True)

    return fwdbwd


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int = 5, reps: int = 30) -> float:
    """Median milliseconds per call: CUDA events with an L2 flush before each call on a GPU."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize(device)
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def copy_bandwidth(device: torch.device, small: bool) -> float:
    """Device-to-device copy GB/s, counting bytes read plus bytes written."""
    n = 2**20 if small else 2**28  # 1 GiB of fp32 on the GPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def peak_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory allocated by one call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ----------------------------------------------------------------------------------------------
# Correctness (float64 references; same rules as tests/kernels)
# ----------------------------------------------------------------------------------------------
def _max_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    err = (actual.double() - expected.double()).abs().max().item()
    return err / max(1.0, expected.double().abs().max().item())


def check_latent(dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    """Errors of reparameterize / kl / reparameterize_kl and their gradients (relative)."""
    mu, logvar = _latent({"B": 333, "D": 77}, dtype, device)
    zeros = torch.zeros(333, 77, dtype=torch.float64, device=device)
    with kernels.use_backend("triton"):
        eps = kernels.reparameterize(zeros, zeros, seed=5)
        z, kl = kernels.reparameterize_kl(mu, logvar, seed=5)
        z_alone = kernels.reparameterize(mu, logvar, seed=5)
        kl_alone = kernels.kl_divergence(mu, logvar)
        gz, gkl = torch.randn_like(z), torch.randn_like(kl)
        dmu, dlv = torch.autograd.grad((z, kl), (mu, logvar), (gz, gkl))
    mu64, lv64 = mu.detach().double(), logvar.detach().double()
    kl64 = kernels.kl_divergence_ref(mu64, lv64)
    g = gkl.double()[:, None]
    exp_dlv = gz.double() * 0.5 * torch.exp(0.5 * lv64) * eps + g * 0.5 * torch.expm1(lv64)
    return {
        "z": _max_rel(z, mu64 + torch.exp(0.5 * lv64) * eps),
        "z_same_as_reparameterize": float(not torch.equal(z, z_alone)),
        "kl": _max_rel(kl, kl64),
        "kl_divergence": _max_rel(kl_alone, kl64),
        "dmu": _max_rel(dmu, gz.double() + g * mu64),
        "dlogvar": _max_rel(dlv, exp_dlv),
        "eps_mean": abs(eps.mean().item()),
        "eps_std_minus_1": abs(eps.std().item() - 1.0),
    }


def check_vq(dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    """Distance excess of the chosen code over the minimum, q == codebook[idx], loss, grads."""
    x, codebook = _vq({"N": 5000, "K": 700, "D": 64}, dtype, device)
    with kernels.use_backend("triton"):
        q, idx, loss = kernels.vq_quantize(x, codebook, beta=0.25)
        dx, de = torch.autograd.grad((q, loss), (x, codebook), (torch.ones_like(q), None))
        counts, sums = kernels.vq_ema_update(x.detach(), idx, 700)
    x64, e64 = x.detach().double(), codebook.detach().double()
    d = torch.cdist(x64, e64).pow(2)
    excess = (d.gather(1, idx[:, None])[:, 0] - d.min(1).values).max().item()
    diff = x64 - e64[idx]
    exp_de = torch.zeros_like(e64).index_add_(0, idx, -2 * diff / diff.numel())
    ref_counts, ref_sums = kernels.vq_ema_update_ref(x64, idx, 700)
    return {
        "distance_excess": excess,
        "q_not_code": float(not torch.equal(q, codebook[idx])),
        "loss": _max_rel(loss, 1.25 * diff.pow(2).mean()),
        "dx": _max_rel(dx, 1 + 0.25 * 2 * diff / diff.numel()),
        "dcodebook": _max_rel(de, exp_de),
        "ema_counts": _max_rel(counts, ref_counts),
        "ema_sums": _max_rel(sums, ref_sums),
    }


# tolerance per dtype for the relative errors above (distance_excess is absolute, D=64)
LIMITS = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def correctness(device: torch.device, dtypes: list[torch.dtype]) -> list[dict[str, Any]]:
    out = []
    for dtype in dtypes:
        for name, check in (("latent", check_latent), ("vq", check_vq)):
            errors = check(dtype, device)
            limit = LIMITS[dtype]
            bounds = {k: (0.05 if k.startswith("eps") else limit * 200 if k == "distance_excess"
                          else limit) for k in errors}  # fmt: skip
            failed = sorted(k for k, v in errors.items() if not v <= bounds[k])
            out.append({"check": name, "dtype": SHORT[dtype],
                        "errors": errors, "bounds": bounds, "ok": not failed, "failed": failed})
    return out


# ----------------------------------------------------------------------------------------------
# Timed sections
# ----------------------------------------------------------------------------------------------
def time_ops(device: torch.device, dtypes: list[torch.dtype], table: dict[str, dict[str, int]],
             copy_gbs: float, reps: int, providers: list[str]) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for spec in OPS.values():
        sizes = sizes_for(spec.name, table)
        for dtype in dtypes:
            if spec.name.startswith("vq") and dtype != torch.float32 and device.type != "cuda":
                continue  # bf16 / fp16 tl.dot: checked on a GPU only
            args = spec.make(sizes, dtype, device)
            item = torch.finfo(dtype).bits // 8
            for mode in ("fwd", "fwdbwd") if spec.differentiable else ("fwd",):
                for provider in providers:
                    rows.append(_time_one(spec, provider, args, mode, sizes, dtype, item,
                                          device, copy_gbs, reps))  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def _time_one(spec: OpSpec, provider: str, args: tuple[Any, ...], mode: str,
              sizes: dict[str, int], dtype: torch.dtype, item: int, device: torch.device,
              copy_gbs: float, reps: int) -> dict[str, Any]:  # fmt: skip
    row: dict[str, Any] = {"group": f"{spec.name}-{mode}-{SHORT[dtype]}",
                           "provider": provider, "sizes": sizes}  # fmt: skip
    try:
        ms = time_ms(make_call(spec, provider, args, mode), device, reps=reps)
    except Exception as err:  # a provider that cannot run here is reported, not fatal
        return {**row, "error": f"{type(err).__name__}: {err}"[:500]}
    gbs = spec.traffic(sizes, item, mode) / (ms * 1e-3) / 1e9
    tflops = flops(spec.name, sizes) / (ms * 1e-3) / 1e12
    return {**row, "ms": ms, "GB/s": gbs, "fraction_of_copy_bw": gbs / copy_gbs,
            "TFLOP/s": tflops or None}  # fmt: skip


def vq_search(
    device: torch.device, sizes: dict[str, int], reps: int, providers: list[str]
) -> list[dict[str, Any]]:
    """Nearest-code search: Triton vs torch.cdist + argmin vs the materialised reference."""
    x = torch.randn(sizes["N"], sizes["D"], device=device)
    codebook = torch.randn(sizes["K"], sizes["D"], device=device)

    def triton_search() -> torch.Tensor:
        with kernels.use_backend("triton"):
            return kernels.vq_nearest(x, codebook)

    compiled_ref = torch.compile(kernels.vq_nearest_ref)
    candidates = {
        "triton": triton_search,
        "cdist+argmin": lambda: torch.cdist(x, codebook).argmin(1),
        "eager": lambda: kernels.vq_nearest_ref(x, codebook),
        "compile": lambda: compiled_ref(x, codebook),
    }
    rows = []
    for provider, fn in candidates.items():
        if provider not in providers and provider != "cdist+argmin":
            continue
        ms = time_ms(fn, device, reps=reps)
        rows.append({"group": "vq_nearest-fwd-fp32", "provider": provider, "sizes": sizes,
                     "ms": ms, "TFLOP/s": flops("vq_quantize", sizes) / (ms * 1e-3) / 1e12,
                     "peak_MiB": peak_mib(fn, device)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    if "triton" not in providers:
        return rows
    same = (triton_search() == candidates["cdist+argmin"]()).float().mean().item()
    rows.append({"group": "vq_nearest-agreement", "fraction_same_index_as_cdist": same})
    return rows


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cpu = f"CPU {platform.processor() or platform.machine()}"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    return {"device": name, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# Kernel benchmarks on {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}; device-to-device copy "
             f"{report['copy_GBps']:.0f} GB/s (read + write), measured in this run.", "",
             "## Correctness", "", "| check | dtype | ok | failed |", "|---|---|---|---|"]
    lines += [f"| {c['check']} | {c['dtype']} | {c['ok']} | {', '.join(c['failed'])} |"
              for c in report["correctness"]]
    lines += ["", "## Timings (median)", "",
              "| group | provider | ms | GB/s | of copy BW | TFLOP/s | peak MiB |",
              "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in report["timings"] + report["vq_search"]:
        if "ms" not in r:
            extra = r.get("error") or r.get("fraction_same_index_as_cdist")
            lines.append(f"| {r['group']} | {r.get('provider', '')} | {extra} | | | | |")
            continue
        lines.append(
            f"| {r['group']} | {r['provider']} | {r['ms']:.4f} | {_fmt(r.get('GB/s'), 0)} | "
            f"{_fmt(r.get('fraction_of_copy_bw'), 2)} | {_fmt(r.get('TFLOP/s'), 1)} | "
            f"{_fmt(r.get('peak_MiB'), 0)} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def report_parser(description: str) -> argparse.ArgumentParser:
    """The flags of the GPU report scripts: --out, --device, --small, --reps, --providers."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="directory for the JSON and markdown")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --small)")
    p.add_argument("--small", action="store_true", help="tiny shapes: a smoke test of the script")
    p.add_argument("--reps", type=int, default=30, help="timed calls per measurement")
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset")
    return p


def main(argv: list[str] | None = None) -> int:
    p = report_parser(__doc__)
    args = p.parse_args(argv)
    providers = [name for name in args.providers.split(",") if name]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        p.error(f"unknown providers {unknown}: expected a subset of {', '.join(PROVIDERS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device is visible: run on a GPU machine, or pass --device cpu --small")
    torch.manual_seed(0)
    table = SIZES_SMALL if args.small else SIZES_GPU
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    copy_gbs = copy_bandwidth(device, args.small)
    report = {
        "environment": environment(device),
        "copy_GBps": copy_gbs,
        "correctness": correctness(device, dtypes + ([torch.float16] if device.type == "cuda"
                                                     else [])),  # fmt: skip
        "timings": time_ops(device, dtypes, table, copy_gbs, args.reps, providers),
        "vq_search": vq_search(device, table["vq"], args.reps, providers),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_kernels.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_kernels.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(c["ok"] for c in report["correctness"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
