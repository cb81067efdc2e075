"""Data-dir faults (issue 16): runs started in parallel on a fresh data dir never read each
other's half-extracted files, and a truncated download is one line naming the file."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from engine.train import main as train_main

from .conftest import DATA_DIR, REPO, assert_clean_failure, needs_mnist

LOAD = ("import sys; from engine.data.images import load_images;"
        " x, y = load_images('mnist', sys.argv[1], train=False);"
        " print(tuple(x.shape), int(y.sum()), int(x.sum()))")


def _fresh_copy(tmp_path: Path) -> Path:
    """A data dir holding only MNIST's four .gz files, as downloaded (nothing extracted)."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in Path(DATA_DIR, "MNIST", "raw").glob("*.gz"):
        shutil.copyfile(gz, raw / gz.name)
    return tmp_path / "data"


def _idx(path: Path) -> np.ndarray:
    """An IDX file read straight from its .gz (the reference): big-endian dims after the magic."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", ndim, 4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@needs_mnist
def test_parallel_first_loads_of_a_fresh_data_dir_all_read_whole_files(tmp_path):
    """Before: torchvision extracted in place, and parallel first loads read half-written files
    (`invalid literal for int() with base 16`): 2 of 8 pytest workers on an H200 machine, and
    this test with 8 processes failed 2 of 2 runs on the 2-core CI machine."""
    data = _fresh_copy(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", LOAD, str(data)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(8)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    raw = data / "MNIST" / "raw"
    images = _idx(raw / "t10k-images-idx3-ubyte.gz")
    labels = _idx(raw / "t10k-labels-idx1-ubyte.gz")
    want = f"{(len(images), 1, 28, 28)} {int(labels.astype(np.int64).sum())}" \
           f" {int(images.astype(np.int64).sum())}"
    assert [out.strip() for out, _ in results] == [want] * 8
    for gz in raw.glob("*.gz"):
        assert gz.with_suffix("").read_bytes() == gzip.decompress(gz.read_bytes())
    assert sorted(p.name for p in raw.iterdir() if ".tmp" in p.name) == []


@needs_mnist
def test_a_truncated_download_is_one_line_naming_the_file(tmp_path, capsys):
    data = _fresh_copy(tmp_path)
    gz = data / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    code = train_main(["--data-dir", str(data), "--out", str(tmp_path / "run"), "--no-progress",
                       "--max-steps", "1"])
    err = capsys.readouterr().err
    assert_clean_failure(code, err)
    assert str(gz) in err and "not a complete gzip file" in err
    assert not gz.with_suffix("").exists()  # nothing half-extracted is left to be read later
    assert sorted(p.name for p in gz.parent.iterdir() if ".tmp" in p.name) == []


@needs_mnist
def test_a_read_only_fresh_data_dir_is_mirrored_whole_and_left_untouched(tmp_path, monkeypatch):
    """A read-only dir holding only the .gz files: they are copied to the cache (each through
    a temp file and a rename) and extracted there; the dir itself is not written."""
    from engine.data.images import load_images

    data = _fresh_copy(tmp_path)
    raw = data / "MNIST" / "raw"
    before = {p.name: p.read_bytes() for p in raw.iterdir()}
    monkeypatch.setenv("VAE_CACHE_DIR", str(tmp_path / "cache"))
    raw.chmod(0o555)
    try:
        x, y = load_images("mnist", data, train=False)
    finally:
        raw.chmod(0o755)
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == before
    labels = _idx(raw / "t10k-labels-idx1-ubyte.gz")
    assert x.shape == (len(labels), 1, 28, 28) and y.tolist() == labels.tolist()
    mirrored = list((tmp_path / "cache").rglob("*"))
    assert sorted(p.name for p in mirrored if p.name.endswith(".gz")) == sorted(before)
    assert [p.name for p in mirrored if ".tmp" in p.name] == []
