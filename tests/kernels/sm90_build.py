"""Compile every Triton kernel for sm_90 (H100/H200) without a GPU: PTX and cubin via ptxas.

The interpreter runs kernel semantics on the CPU but never lowers them; this catches what only
the compiler sees (constexpr handling, layouts of tl.join/tl.reshape, fp64 tl.dot, atomics).
Run in a process where TRITON_INTERPRET is unset (tests/kernels/test_sm90_build.py does):
    PYTHONPATH=. python tests/kernels/sm90_build.py [--all]
(--all: every kernel in fp32, fp16, bf16 and fp64, about 40 compiles).
Prints one line per kernel variant and exits 1 if any fails.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)

# pointer arguments that are not of the input dtype T
POINTERS: dict[str, dict[str, str]] = {
    "_reparameterize_fwd_kernel": {"seed_ptr": "*i64"},
    "_reparameterize_bwd_kernel": {"seed_ptr": "*i64"},
    "_kl_divergence_fwd_kernel": {"kl_ptr": "ACC"},
    "_kl_divergence_bwd_kernel": {"g_ptr": "ACC"},
    "_reparameterize_kl_fwd_kernel": {"kl_ptr": "ACC", "seed_ptr": "*i64"},
    "_reparameterize_kl_bwd_kernel": {"gkl_ptr": "ACC", "seed_ptr": "*i64"},
    "_vq_quantize_fwd_kernel": {"idx_ptr": "*i64", "sqerr_ptr": "ACC"},
    "_vq_quantize_bwd_kernel": {"coef_ptr": "ACC", "idx_ptr": "*i64", "de_ptr": "ACC"},
    "_vq_ema_update_fwd_kernel": {"idx_ptr": "*i64", "counts_ptr": "*fp32", "sums_ptr": "*fp32"},
    "_group_norm_silu_fwd_stats_kernel": {"part_ptr": "*fp32"},
    "_group_norm_silu_fwd_kernel": {"mean_ptr": "*fp32", "rstd_ptr": "*fp32", "part_ptr": "*fp32"},
    "_group_norm_silu_bwd_stats_kernel": {"mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                                          "dwb_ptr": "*fp32", "part_ptr": "*fp32"},
    "_group_norm_silu_bwd_kernel": {"mean_ptr": "*fp32", "rstd_ptr": "*fp32", "dwb_ptr": "*fp32",
                                    "part_ptr": "*fp32"},
}  # fmt: skip
FLOAT_ARGS = {"eps"}  # scalar arguments passed as Python floats
NO_FP64 = {name for name in POINTERS if "group_norm" in name}  # fp16 / bf16 / fp32 kernels
DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16", "fp64": "*fp64"}


def _kernels() -> dict[str, tuple[Any, dict[str, Any]]]:
    """name -> (LazyJit kernel, constexprs other than IS_FP64)."""
    from kernels import gn_silu, gn_silu_bwd, kl, reparam, reparam_kl, vq, vq_ema

    vq_fwd = {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 64, "QUANTIZE": True, "PRECISION": "ieee"}
    rows, flat = {"BLOCK_R": 32, "BLOCK_D": 128}, {"BLOCK": 1024}
    tiles = {"BLOCK_N": 64, "BLOCK_D": 64}
    gn = {"BLOCK_C": 16, "BLOCK_HW": 256}  # SD decoder: 512 channels in 32 groups
    gn_split = {**gn, "BLOCK_S": 8, "SPLIT": True}
    return {
        "_reparameterize_fwd_kernel": (reparam._reparameterize_fwd_kernel, flat),
        "_reparameterize_bwd_kernel": (reparam._reparameterize_bwd_kernel, flat),
        "_kl_divergence_fwd_kernel": (kl._kl_divergence_fwd_kernel, rows),
        "_kl_divergence_bwd_kernel": (kl._kl_divergence_bwd_kernel, rows),
        "_reparameterize_kl_fwd_kernel": (reparam_kl._reparameterize_kl_fwd_kernel, rows),
        "_reparameterize_kl_bwd_kernel": (reparam_kl._reparameterize_kl_bwd_kernel, flat),
        "_vq_quantize_fwd_kernel": (vq._vq_quantize_fwd_kernel, vq_fwd),
        "_vq_quantize_bwd_kernel": (vq._vq_quantize_bwd_kernel, {**tiles, "NEED_DE": True}),
        "_vq_ema_update_fwd_kernel": (vq_ema._vq_ema_update_fwd_kernel, tiles),
        "_group_norm_silu_fwd_stats_kernel": (gn_silu._group_norm_silu_fwd_stats_kernel, gn),
        "_group_norm_silu_fwd_kernel": (gn_silu._group_norm_silu_fwd_kernel, gn_split),
        "_group_norm_silu_bwd_stats_kernel": (gn_silu_bwd._group_norm_silu_bwd_stats_kernel, gn),
        "_group_norm_silu_bwd_kernel": (gn_silu_bwd._group_norm_silu_bwd_kernel, gn_split),
    }  # fmt: skip


def _signature(fn: Any, name: str, dtype: str) -> dict[str, str]:
    acc = "*fp64" if dtype == "fp64" else "*fp32"
    sig = {}
    for i, arg in enumerate(fn.arg_names):
        if i in fn.constexprs:
            sig[arg] = "constexpr"
        elif arg in FLOAT_ARGS:
            sig[arg] = "fp32"
        elif arg.endswith("_ptr"):
            ty = POINTERS[name].get(arg, DTYPES[dtype])
            sig[arg] = acc if ty == "ACC" else ty
        else:
            sig[arg] = "i32"
    return sig


def build(name: str, dtype: str, extra: dict[str, Any]) -> str:
    """Compile one variant to a cubin; returns a report line."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels._common import jitted

    kernel, constexprs = _kernels()[name]
    fn = jitted(kernel)
    constexprs = {**constexprs, **extra}
    if "IS_FP64" in fn.arg_names:
        constexprs["IS_FP64"] = dtype == "fp64"
    src = ASTSource(fn=fn, signature=_signature(fn, name, dtype), constexprs=constexprs)
    try:
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        return f"ok   {name} {dtype} {extra or ''} cubin={len(out.asm['cubin'])} bytes"
    except Exception as err:  # report every failure, not only the first
        return f"FAIL {name} {dtype} {extra or ''}: {type(err).__name__}: {err}"[:2000]


def cases(full: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """Every kernel in fp32 plus the variants that lower differently; `full`: every dtype."""
    out = [(name, dtype, {}) for name in POINTERS for dtype in (DTYPES if full else ["fp32"])
           if not (dtype == "fp64" and name in NO_FP64)]  # fmt: skip
    out.append(("_vq_quantize_fwd_kernel", "fp32", {"PRECISION": "tf32"}))
    out.append(("_vq_quantize_fwd_kernel", "fp16", {"QUANTIZE": False}))
    out.append(("_vq_quantize_bwd_kernel", "fp32", {"NEED_DE": False}))
    out += [(f"_group_norm_silu_{d}_kernel", "fp32", {"SPLIT": False}) for d in ("fwd", "bwd")]
    out.append(("_group_norm_silu_fwd_kernel", "fp16",
                {"BLOCK_C": 1, "BLOCK_HW": 4096, "SPLIT": False}))  # C == G  # fmt: skip
    if not full:
        out += [("_vq_quantize_fwd_kernel", dt, {}) for dt in ("bf16", "fp64")]
        out += [("_vq_quantize_bwd_kernel", "fp64", {}), ("_reparameterize_fwd_kernel", "bf16", {})]
        out += [(f"_group_norm_silu_{d}_kernel", dt, {}) for d, dt in (("fwd", "bf16"),
                                                                        ("bwd", "fp16"))]
    return out


def main() -> int:
    jobs = cases(full="--all" in sys.argv)
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        lines = list(pool.map(build, *zip(*jobs)))
    print("\n".join(lines))
    return 1 if any(line.startswith("FAIL") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
