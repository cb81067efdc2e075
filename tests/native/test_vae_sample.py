"""The C++ runner `vae_sample` against the Python runtime, on a small exported MLP decoder.

    pytest tests/native -q          # builds the runner once (cmake + ninja, -j2) and exports
                                    # two .pt2 packages with python -m export.aoti (~2 min)
    VAE_NATIVE_BUILD_DIR=build pytest tests/native   # reuse (or create) a persistent build

Skipped only when cmake or a C++ compiler is missing; a failing configure or build fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_package import REPO, make_package  # noqa: E402
from parity import ATOL, check_parity, reference_decoder, run_binary  # noqa: E402

pytestmark = pytest.mark.slow


def _missing_toolchain() -> str | None:
    if shutil.which("cmake") is None:
        return "cmake is not on PATH"
    compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    if not any(c and shutil.which(c) for c in compilers):
        return "no C++ compiler (c++, g++, clang++ or $CXX) on PATH"
    return None


def _run(cmd: list[str], what: str, timeout: float) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{what} failed ({proc.returncode}): {' '.join(cmd)}\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


@pytest.fixture(scope="session")
def native_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One configure + build of the native targets for the whole session."""
    why = _missing_toolchain()
    if why:
        pytest.skip(f"cannot build the native runner: {why}")
    build = (Path(os.environ["VAE_NATIVE_BUILD_DIR"]).resolve()
             if os.environ.get("VAE_NATIVE_BUILD_DIR") else tmp_path_factory.mktemp("native"))
    fresh = not (build / "CMakeCache.txt").exists()  # the generator of a build cannot change
    generator = ["-G", "Ninja"] if shutil.which("ninja") and fresh else []
    _run(["cmake", "-S", str(REPO), "-B", str(build), *generator,
          f"-DPython3_EXECUTABLE={sys.executable}"], "cmake configure", 300)
    _run(["cmake", "--build", str(build), "-j", "2"], "cmake build", 900)
    return build


@pytest.fixture(scope="session")
def binary(native_build: Path) -> Path:
    return native_build / "vae_sample"


@pytest.fixture(scope="session")
def decoder_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MLP decoder (latent 8 -> 1x28x28), exported by python -m export.aoti."""
    return make_package(tmp_path_factory.mktemp("pkg"), hidden=64, latent=8)


@pytest.fixture(scope="session")
def cond_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Conditional MLP decoder (3 classes), exported by python -m export.aoti."""
    return make_package(tmp_path_factory.mktemp("pkg_cond"), hidden=32, latent=4, classes=3)


def test_help(binary: Path) -> None:
    proc = run_binary(binary, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: vae_sample PACKAGE")


@pytest.mark.parametrize("n,batch_size", [(37, 8), (1, 1), (5, 64)])
def test_parity_with_python_runtime(binary: Path, decoder_pt2: Path, tmp_path: Path,
                                    n: int, batch_size: int) -> None:
    err = check_parity(binary, decoder_pt2, tmp_path, n=n, batch_size=batch_size, seed=n)
    assert err <= ATOL


def test_seeded_sampling_matches_sampler(binary: Path, decoder_pt2: Path, tmp_path: Path) -> None:
    """--seed S draws the latents torch.Generator().manual_seed(S) draws (Sampler.sample)."""
    from engine.runtime import Sampler

    proc = run_binary(binary, decoder_pt2, "--n", "12", "--seed", "123", "--batch-size", "5",
                      "--out", tmp_path / "x.npy")
    assert proc.returncode == 0, proc.stderr
    expected = Sampler.load(str(decoder_pt2)).sample(12, seed=123).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "x.npy"), expected, rtol=0, atol=ATOL)


def test_conditional_labels(binary: Path, cond_pt2: Path, tmp_path: Path) -> None:
    check_parity(binary, cond_pt2, tmp_path, n=10, batch_size=4)  # explicit --labels
    proc = run_binary(binary, cond_pt2, "--n", "7", "--seed", "1", "--out", tmp_path / "d.npy")
    assert proc.returncode == 0, proc.stderr
    z = torch.randn((7, 4), generator=torch.Generator().manual_seed(1))
    default_labels = torch.arange(7) % 3  # documented default: 0, 1, 2, 0, ...
    with torch.no_grad():
        expected = reference_decoder(cond_pt2)(z, default_labels).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "d.npy"), expected, rtol=0, atol=ATOL)


def _read_pnm(path: Path) -> tuple[str, np.ndarray]:
    data = path.read_bytes()
    m = re.match(rb"(P[56])\n(\d+) (\d+)\n255\n", data)
    assert m, f"bad PNM header in {path}: {data[:20]!r}"
    w, h = int(m.group(2)), int(m.group(3))
    channels = 1 if m.group(1) == b"P5" else 3
    pix = np.frombuffer(data[m.end():], dtype=np.uint8)
    assert pix.size == w * h * channels
    return m.group(1).decode(), pix.reshape(h, w, channels)


def test_grid(binary: Path, decoder_pt2: Path, tmp_path: Path) -> None:
    proc = run_binary(binary, decoder_pt2, "--n", "5", "--out", tmp_path / "x.npy",
                      "--grid", tmp_path / "g.pgm")
    assert proc.returncode == 0, proc.stderr
    kind, pix = _read_pnm(tmp_path / "g.pgm")
    x = np.load(tmp_path / "x.npy")  # (5, 1, 28, 28): 3 columns x 2 rows, 2-pixel padding
    assert kind == "P5" and pix.shape == (2 * 30 + 2, 3 * 30 + 2, 1)
    expected_img4 = np.rint(np.clip(x[4, 0], 0, 1) * 255)  # row 1, column 1
    np.testing.assert_allclose(pix[32:60, 32:60, 0], expected_img4, atol=1)
    assert pix[:2].max() == 0 and pix[32:60, 62:90].max() == 0  # padding, empty cell


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# name -> (args given (package, tmp dir), expected exit status, regex of the one-line message)
BAD_INPUTS = {
    "missing_package": (lambda p, d: [d / "nope.pt2", "--n", "2", "--out", d / "x.npy"],
                        1, r"package '.*nope\.pt2' not found"),
    "corrupt_package": (lambda p, d: [_write(d / "bad.pt2", b"\x00garbage" * 50), "--n", "2",
                                      "--out", d / "x.npy"], 1, r"is not an AOTInductor \.pt2"),
    "truncated_package": (lambda p, d: [_write(d / "cut.pt2", p.read_bytes()[:50_000]), "--n",
                                        "2", "--out", d / "x.npy"],
                          1, r"cannot read AOTInductor package .*cut\.pt2"),
    "wrong_latent_shape": (lambda p, d: [p, "--latents", _npy(d / "z.npy", np.zeros((3, 9),
                                         np.float32)), "--out", d / "x.npy"],
                           1, r"wrong latent shape in .*z\.npy: the package expects \(N, 8\), "
                              r"got \(3, 9\)"),
    "latents_float64": (lambda p, d: [p, "--latents", _npy(d / "z.npy", np.zeros((3, 8))),
                                      "--out", d / "x.npy"], 1, r"expected dtype '<f4'.*'<f8'"),
    "latents_fortran": (lambda p, d: [p, "--latents", _npy(d / "z.npy", np.asfortranarray(
                            np.zeros((3, 8), np.float32))), "--out", d / "x.npy"],
                        1, r"fortran_order is True"),
    "latents_not_npy": (lambda p, d: [p, "--latents", _write(d / "z.npy", b"1,2,3\n"), "--out",
                                      d / "x.npy"], 1, r"not a \.npy file \(bad magic"),
    "missing_output_dir": (lambda p, d: [p, "--n", "2", "--out", d / "no" / "x.npy"],
                           2, r"output directory '.*no' of --out .* does not exist"),
    "labels_on_unconditional": (lambda p, d: [p, "--n", "2", "--labels", _npy(
                                    d / "y.npy", np.zeros(2, np.int64)), "--out", d / "x.npy"],
                                2, r"--labels given but the package is unconditional"),
    "device_mismatch": (lambda p, d: [p, "--n", "2", "--device", "cuda", "--out", d / "x.npy"],
                        2, r"compiled for cpu but --device cuda"),
    "bad_batch_size": (lambda p, d: [p, "--n", "2", "--batch-size", "0", "--out", d / "x.npy"],
                       2, r"--batch-size must be >= 1, got 0"),
    "grid_extension": (lambda p, d: [p, "--n", "2", "--out", d / "x.npy", "--grid",
                                     d / "g.ppm"], 1, r"outputs have 1 channel\(s\), use a \.pgm"),
}


def _npy(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(binary: Path, decoder_pt2: Path, tmp_path: Path, case: str) -> None:
    make_args, status, pattern = BAD_INPUTS[case]
    proc = run_binary(binary, *make_args(decoder_pt2, tmp_path))
    message = proc.stderr.strip()
    assert proc.returncode == status, f"exit {proc.returncode}, stderr: {message}"
    assert "\n" not in message, f"expected one line, got:\n{message}"
    assert re.match(r"vae_sample: error: ", message) and re.search(pattern, message), message
    assert not (tmp_path / "x.npy").exists()


def test_bench_json(binary: Path, decoder_pt2: Path) -> None:
    proc = run_binary(binary, decoder_pt2, "--n", "1", "--batch-size", "1", "--repeat", "50",
                      "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    t = json.loads(proc.stdout)
    assert t["backend"] == "aoti" and t["batch"] == 1 and t["repeat"] == 50
    assert 0 < t["p10_ms"] <= t["median_ms"] <= t["p90_ms"]


def test_ctest(native_build: Path) -> None:
    """The ctest suite (help, bad inputs without a package, .npy/grid self-test) passes."""
    proc = subprocess.run(["ctest", "--output-on-failure"], cwd=native_build, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert re.search(r"100% tests passed", proc.stdout)
