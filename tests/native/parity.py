"""Parity of the C++ runner `vae_sample` with the Python runtime on the same `.pt2`.

    python tests/native/parity.py --binary build/vae_sample --package export/decoder.pt2

Writes random latents (and labels for a conditional package) as .npy, runs the binary with
`--latents` in batches that do not divide N, and compares its output with the Python reference
decoding the same latents in one call. Used by ctest (`-DVAE_TEST_PACKAGE=...`) and by
tests/native/test_vae_sample.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# Both sides run the same compiled kernels; only the batch split differs (GEMM blocking),
# which moves float32 sigmoid outputs in [0, 1] by a few ulps.
ATOL = 1e-5


def package_metadata(package: str | Path) -> dict[str, str]:
    """The string map embedded in a .pt2 (read by the loader, like the C++ runner does)."""
    return dict(torch._inductor.aoti_load_package(str(package)).get_metadata())


def reference_decoder(package: str | Path) -> Callable[..., torch.Tensor]:
    """The Python runtime on `package`: engine.runtime.Sampler when it exists, else AOTI."""
    try:
        from engine.runtime import Sampler
    except ImportError:
        runner = torch._inductor.aoti_load_package(str(package))
        return lambda z, y=None: runner(z) if y is None else runner(z, y)
    sampler = Sampler.load(str(package))
    return lambda z, y=None: sampler.decode(z, labels=y)


def latent_shape(meta: dict[str, str]) -> tuple[int, ...]:
    return tuple(int(d) for d in meta["latent_shape"].split(","))


def run_binary(binary: str | Path, *args: str | Path, timeout: float = 120
               ) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def write_inputs(workdir: Path, meta: dict[str, str], n: int, seed: int
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Random float32 latents (and int64 labels if conditional) saved as z.npy / y.npy."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, *latent_shape(meta)), dtype=np.float32)
    np.save(workdir / "z.npy", z)
    y = None
    if meta.get("conditional") == "1":
        y = rng.integers(0, int(meta["num_classes"]), size=n, dtype=np.int64)
        np.save(workdir / "y.npy", y)
    return z, y


def check_parity(binary: str | Path, package: str | Path, workdir: str | Path, n: int = 37,
                 batch_size: int = 8, seed: int = 0) -> float:
    """Max abs difference between vae_sample and the Python reference; raises on failure."""
    workdir = Path(workdir)
    meta = package_metadata(package)
    z, y = write_inputs(workdir, meta, n, seed)
    args = [package, "--latents", workdir / "z.npy", "--batch-size", str(batch_size),
            "--out", workdir / "x.npy"]
    if y is not None:
        args += ["--labels", workdir / "y.npy"]
    proc = run_binary(binary, *args)
    if proc.returncode != 0:
        raise RuntimeError(f"vae_sample failed ({proc.returncode}): {proc.stderr.strip()}")
    got = np.load(workdir / "x.npy")
    with torch.no_grad():
        ref = reference_decoder(package)(torch.from_numpy(z),
                                         None if y is None else torch.from_numpy(y)).numpy()
    if got.shape != ref.shape or got.dtype != np.float32:
        raise AssertionError(f"vae_sample wrote {got.dtype} {got.shape}, expected float32 "
                             f"{ref.shape}")
    err = float(np.abs(got - ref).max())
    if not err <= ATOL:
        raise AssertionError(f"vae_sample differs from the Python runtime: max abs {err:.3e} "
                             f"> {ATOL:.0e}")
    return err


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", required=True)
    ap.add_argument("--package", required=True)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--n", type=int, default=37)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        try:
            err = check_parity(args.binary, args.package, workdir, args.n, args.batch_size)
        except (RuntimeError, AssertionError) as e:
            print(f"parity: FAIL: {e}", file=sys.stderr)
            return 1
    print(json.dumps({"parity": "ok", "max_abs": err, "atol": ATOL}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
