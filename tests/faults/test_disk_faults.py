"""A read-only or full output directory, for every command that writes: one `error:` line that
names the path, the cause (read-only / no space left) and the fix; every file that was there
before is unchanged; no temp file or half-written artifact is left visible.

The output folders are real mounts: a read-only bind mount, and a small tmpfs filled with a
dummy file until only a few KiB are free. Mounting needs root: without it (or when `mount`
fails) the tests skip with the reason. Every mount is unmounted by the fixture's finalizer.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from engine import checkpoint as ckpt
from engine.training.runlog import append_jsonl, read_jsonl

from .conftest import DATA_DIR, REPO, assert_clean_failure, assert_intact, needs_mnist, snapshot

READ_ONLY, FULL = "read-only", "full"
CAUSE = {READ_ONLY: "read-only", FULL: "no space left"}
TMPFS_KB = 8192
SMALL = ("--model", "mlp", "--hidden-dims", "16", "--latent-dim", "4", "--batch-size", "64",
         "--no-progress", "--data-dir", DATA_DIR)


# --- mounts ---------------------------------------------------------------------------------------
def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} failed ({done.stderr.strip()}); these tests need"
                    " root and a kernel that allows tmpfs and bind mounts")


def fill(root: Path, leave_kb: int) -> None:
    """A dummy file that leaves about `leave_kb` KiB free on root's file system."""
    st = os.statvfs(root)
    size = max(0, st.f_bavail * st.f_frsize - leave_kb * 1024)
    with open(root / "filler.bin", "wb") as f:
        for start in range(0, size, 1 << 20):
            f.write(b"\0" * min(1 << 20, size - start))


class Place:
    """An output folder on a read-only mount or a nearly full tmpfs, holding what `populate`
    put there before it became read-only or full."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path, self.mounted = tmp_path, []

    def make(self, kind: str, populate: Callable[[Path], None] = lambda p: None,
             leave_kb: int = 8) -> Path:
        mnt = self.tmp_path / f"mnt-{len(self.mounted)}"
        mnt.mkdir()
        if kind == READ_ONLY:
            src = self.tmp_path / f"src-{len(self.mounted)}"
            src.mkdir()
            populate(src)
            _mount("--bind", str(src), str(mnt))
            self.mounted.append(mnt)
            _mount("-o", "remount,bind,ro", str(mnt))
        else:
            _mount("-t", "tmpfs", "-o", f"size={TMPFS_KB}k", "tmpfs", str(mnt))
            self.mounted.append(mnt)
            populate(mnt)
            fill(mnt, leave_kb)
        return mnt

    def free(self, mnt: Path) -> None:
        """Make room again (the filler goes): the disk was cleaned up."""
        (mnt / "filler.bin").unlink()

    def unmount_all(self) -> None:
        for mnt in reversed(self.mounted):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def places(tmp_path: Path) -> Iterator[Place]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only bind mount and a tmpfs")
    place = Place(tmp_path)
    try:
        yield place
    finally:
        place.unmount_all()


# --- running a command ----------------------------------------------------------------------------
def run_cli(main: Callable[[list[str]], int], argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of main(argv); an exception escaping main is a traceback."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception:  # noqa: BLE001 - what the user would see: a traceback
        code = 1
        print(traceback.format_exc(), file=sys.stderr)
    return code, capsys.readouterr().err


def no_temp_left(root: Path) -> None:
    """No `*.tmp*` file or folder anywhere (a checkpoint's `last.tmp/` holds plain names)."""
    left = [str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name]
    assert not left, f"temp files or folders left behind: {left}"


def check_failure(kind: str, code: int, err: str, mnt: Path, before: dict[str, str]) -> None:
    assert_clean_failure(code, err)
    assert str(mnt) in err, f"the error does not name the path under {mnt}: {err}"
    assert CAUSE[kind] in err.lower(), f"the error does not say {CAUSE[kind]!r}: {err}"
    assert_intact(mnt, before)
    no_temp_left(mnt)


def keep_notes(root: Path) -> None:
    """A file of the user's that must survive whatever the command does."""
    (root / "notes.txt").write_text(f"mine {os.urandom(8).hex()}\n")


def copy_into(src: Path) -> Callable[[Path], None]:
    def populate(root: Path) -> None:
        shutil.copytree(src, root, dirs_exist_ok=True)
        keep_notes(root)

    return populate


BOTH = pytest.mark.parametrize("kind", [READ_ONLY, FULL])


# --- shared inputs (built once) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory) -> Path:
    """A finished 4-step MLP run on MNIST (checkpoints, metrics, previews, test.json)."""
    if not Path(DATA_DIR, "MNIST", "raw").is_dir():
        pytest.skip(f"MNIST not found under {DATA_DIR}; set VAE_DATA_DIR")
    from engine.train import main

    out = tmp_path_factory.mktemp("disk") / "run"
    assert main([*SMALL, "--out", str(out), "--max-steps", "4", "--eval-batch-size", "5000"]) == 0
    return out


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory) -> Path:
    """A random small MLP checkpoint and its ONNX export (export/ beside last/)."""
    from engine.models import build_model
    from export.onnx import main

    run = tmp_path_factory.mktemp("disk") / "ckpt"
    torch.manual_seed(0)
    ckpt.save(run / "last", build_model("mlp", preset="mlp-mnist", hidden_dims=(64,),
                                        latent_dim=8).eval())
    assert main([str(run), "--parity-batches", "1,3"]) == 0
    return run


# --- engine.train ---------------------------------------------------------------------------------
@needs_mnist
@BOTH
def test_train_into_a_read_only_or_full_folder(places, capsys, kind):
    from engine.train import main

    mnt = places.make(kind, keep_notes)
    before = snapshot(mnt)
    code, err = run_cli(main, [*SMALL, "--out", str(mnt / "run"), "--max-steps", "2"], capsys)
    check_failure(kind, code, err, mnt, before)


@needs_mnist
@BOTH
def test_resume_whose_checkpoint_does_not_fit_keeps_the_run(mlp_run, places, capsys, kind):
    """The run lives on the full disk (room for config, metrics and previews, not for a
    checkpoint), or on a read-only one: the old checkpoints stay, metrics.jsonl gets no torn
    line, and once there is room again the run resumes from where it was. (Resuming inside
    epoch 1 legitimately rewrites config.json and the epoch-1 previews before the save.)"""
    from engine.train import main

    mnt = places.make(kind, copy_into(mlp_run), leave_kb=160)
    before = snapshot(mnt)
    argv = [*SMALL, "--out", str(mnt), "--resume", "--max-steps", "8"]
    code, err = run_cli(main, argv, capsys)
    assert_clean_failure(code, err)
    assert str(mnt) in err and CAUSE[kind] in err.lower(), err
    after = snapshot(mnt)
    for name in ("last/", "best/", "test.json", "notes.txt"):
        assert {k: v for k, v in after.items() if k.startswith(name)} == \
            {k: v for k, v in before.items() if k.startswith(name)}, f"{name} changed"
    old, new = (mlp_run / "metrics.jsonl").read_text(), (mnt / "metrics.jsonl").read_text()
    assert new.startswith(old) and new.endswith("\n")
    assert len(read_jsonl(mnt / "metrics.jsonl")) == len(new.splitlines())  # no torn line
    no_temp_left(mnt)
    if kind == FULL:
        places.free(mnt)
        assert main(argv) == 0
        assert ckpt.read(mnt).step == 8


# --- export.* -------------------------------------------------------------------------------------
@BOTH
def test_onnx_export_into_a_read_only_or_full_folder(onnx_export, places, capsys, kind):
    from export.onnx import main

    mnt = places.make(kind, keep_notes)
    before = snapshot(mnt)
    argv = [str(onnx_export), "--out", str(mnt / "export"), "--parity-batches", "1"]
    check_failure(kind, *run_cli(main, argv, capsys), mnt, before)


def test_onnx_export_over_an_export_on_a_full_disk(onnx_export, places, capsys):
    from export.onnx import main

    def populate(root: Path) -> None:  # the disk holds the export (a folder, not the mount)
        shutil.copytree(onnx_export / "export", root / "export")
        keep_notes(root)

    mnt = places.make(FULL, populate, leave_kb=8)
    before = snapshot(mnt)
    argv = [str(onnx_export), "--out", str(mnt / "export"), "--parity-batches", "1"]
    check_failure(FULL, *run_cli(main, argv, capsys), mnt, before)


def test_aoti_package_on_a_full_disk(onnx_export, places):
    """torch's archive writer aborts the process on ENOSPC; the package is built elsewhere and
    copied into place. A subprocess, so that an abort cannot take pytest down with it."""
    mnt = places.make(FULL, keep_notes, leave_kb=8)
    before = snapshot(mnt)
    done = subprocess.run([sys.executable, "-m", "export.aoti", str(onnx_export), "--out",
                           str(mnt / "export"), "--parity-batches", "1"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    err = "\n".join(line for line in done.stderr.splitlines()
                    if not line.startswith("W"))  # torch's logging warnings (no CUDA, ...)
    check_failure(FULL, done.returncode, err, mnt, before)


@BOTH
def test_triton_repository_on_a_read_only_or_full_disk(onnx_export, places, capsys, kind):
    from export.triton import main

    mnt = places.make(kind, keep_notes)
    before = snapshot(mnt)
    argv = [str(onnx_export / "export"), "--out", str(mnt / "repo"), "--name", "m"]
    check_failure(kind, *run_cli(main, argv, capsys), mnt, before)


# --- engine.sample --------------------------------------------------------------------------------
def _grid_there(root: Path) -> None:
    keep_notes(root)
    (root / "grid.png").write_bytes(os.urandom(3000))  # a previous result, to be kept
    (root / "grid.safetensors").write_bytes(os.urandom(3000))


@BOTH
def test_sample_grid_on_a_read_only_or_full_disk(onnx_export, places, capsys, kind):
    from engine.sample import main

    mnt = places.make(kind, _grid_there, leave_kb=4)
    before = snapshot(mnt)
    argv = ["random", str(onnx_export), "--backend", "eager", "--n", "256", "--seed", "1",
            "--save-tensors", "--out", str(mnt / "grid.png")]
    check_failure(kind, *run_cli(main, argv, capsys), mnt, before)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    diffusers = pytest.importorskip("diffusers", reason="builds the tiny latent-diffusion VAE")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 8, 8),
                                    decoder_block_out_channels=(8, 8, 8),
                                    num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1),
                                    latent_channels=4)
    folder = tmp_path_factory.mktemp("disk") / "vae"
    vae.save_pretrained(folder)
    return folder


@BOTH
def test_sample_decode_and_encode_on_a_read_only_or_full_disk(tiny_vae, places, capsys, kind,
                                                              tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from engine.analysis import latent_diffusion
    from engine.sample import main

    # progress bars share stderr with the error line
    monkeypatch.setattr(latent_diffusion, "tqdm", functools.partial(tqdm, disable=True))

    latents = tmp_path / "z.safetensors"
    save_file({"latents": torch.randn(2, 4, 16, 16)}, str(latents))
    image = tmp_path / "in.png"
    from PIL import Image

    Image.fromarray(torch.randint(0, 256, (128, 128, 3), dtype=torch.uint8).numpy()).save(image)
    mnt = places.make(kind, keep_notes, leave_kb=4)
    before = snapshot(mnt)
    decode = ["decode", str(latents), "--vae", str(tiny_vae), "--out", str(mnt / "png")]
    check_failure(kind, *run_cli(main, decode, capsys), mnt, before)
    encode = ["encode", *[str(image)] * 8, "--vae", str(tiny_vae), "--out",
              str(mnt / "z.safetensors")]
    check_failure(kind, *run_cli(main, encode, capsys), mnt, before)


# --- engine.evaluate, engine.plot, engine.anomaly -------------------------------------------------
@needs_mnist
@BOTH
def test_evaluate_report_on_a_read_only_or_full_disk(mlp_run, places, capsys, kind):
    from engine.evaluate import main

    def old_report(root: Path) -> None:
        keep_notes(root)
        (root / "report.json").write_text(json.dumps({"old": os.urandom(8).hex()}))

    mnt = places.make(kind, old_report, leave_kb=0)
    before = snapshot(mnt)
    argv = [str(mlp_run), "--max-images", "50", "--out", str(mnt / "report.json")]
    check_failure(kind, *run_cli(main, argv, capsys), mnt, before)


@BOTH
def test_plot_on_a_read_only_or_full_disk(places, capsys, kind, tmp_path):
    from engine.plot import main

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"epoch": e, "step": 10 * e, "train_loss": 200.0 / e, "val_loss": 210.0 / e,
             "beta": 1.0} for e in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mnt = places.make(kind, keep_notes, leave_kb=4)
    before = snapshot(mnt)
    argv = [str(run), "--curves-only", "--out", str(mnt / "plots")]
    check_failure(kind, *run_cli(main, argv, capsys), mnt, before)


@BOTH
def test_anomaly_summary_on_a_read_only_or_full_disk(places, capsys, kind, tmp_path):
    from engine.anomaly import main

    reports = []
    for c in range(10):  # long checkpoint paths: the summary (~20 KB) outgrows the old one
        per_class = {str(k): float(k + c) for k in range(10)}
        report = {"elbo": -100.0 - c, "checkpoint": f"runs/no{c}/" + "d" * 2000, "anomaly": {
            "holdout_class": c, "roc_auc": 0.5 + c / 40, "score": "elbo",
            "mean_score_per_class": per_class}}
        reports.append(tmp_path / f"r{c}.json")
        reports[-1].write_text(json.dumps(report))

    def old_summary(root: Path) -> None:  # an earlier summary, a few bytes long
        keep_notes(root)
        (root / "summary.json").write_text(json.dumps({"old": os.urandom(8).hex()}))

    mnt = places.make(kind, old_summary, leave_kb=0)
    before = snapshot(mnt)
    argv = [*map(str, reports), "--json", str(mnt / "summary.json"), "--markdown",
            str(mnt / "summary.md")]
    check_failure(kind, *run_cli(main, argv, capsys), mnt, before)


# --- the writers themselves -----------------------------------------------------------------------
def test_a_failed_metrics_append_leaves_no_torn_line(places):
    """A row that does not fit is not half written: the file keeps its last whole line."""
    def metrics(root: Path) -> None:
        # the last page of the file has ~100 bytes free: a longer row fits only in part
        rows = "".join(json.dumps({"step": i, "loss": 1.0 / (i + 1)}) + "\n" for i in range(400))
        (root / "metrics.jsonl").write_text(rows + "x" * (4096 - 100 - len(rows) % 4096) + "\n")

    mnt = places.make(FULL, metrics, leave_kb=0)
    before = snapshot(mnt)
    with pytest.raises(OSError) as info:
        append_jsonl(mnt / "metrics.jsonl", {"step": 401, "pad": "y" * 1000})
    assert info.value.errno == errno.ENOSPC and str(mnt / "metrics.jsonl") in str(info.value)
    assert_intact(mnt, before)


@BOTH
def test_a_checkpoint_save_that_fails_keeps_the_old_one(places, kind):
    from engine.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", preset="mlp-mnist", hidden_dims=(64,), latent_dim=8)

    def old_checkpoint(root: Path) -> None:
        ckpt.save(root / "last", model)

    mnt = places.make(kind, old_checkpoint, leave_kb=64)
    before = snapshot(mnt)
    with pytest.raises(OSError) as info:
        ckpt.save(mnt / "last", model, extra_tensors={"m": torch.randn(100_000)})
    assert str(mnt / "last") in ckpt.describe_os_error(info.value)
    assert_intact(mnt, before)
    no_temp_left(mnt)
    assert ckpt.read(mnt / "last").path == mnt / "last"


def test_crystal_cifs_that_cannot_be_written_are_an_error_not_skipped(places):
    pytest.importorskip("pymatgen", reason="CIF writing needs pymatgen")
    import numpy as np

    from engine.crystal.structures import make_structure, write_cifs

    rng = np.random.default_rng()
    s = make_structure(np.array([8, 14]), rng.random((2, 3)), np.full(3, 5.0), np.full(3, 90.0))
    mnt = places.make(READ_ONLY, keep_notes)
    before = snapshot(mnt)
    with pytest.raises(OSError, match="read-only|Read-only"):
        write_cifs([s, s], mnt / "sample", "sample")
    assert_intact(mnt, before)
