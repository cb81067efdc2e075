"""Exports are all or nothing: artifacts and their manifest are committed together, a failed
export leaves the previous one byte-identical, and a crash between the two renames of the
commit leaves a verified artifact for the runtime and for the next export."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt
from engine.models import build_model
from engine.runtime import Sampler
from export import common, manifest, triton
from export import onnx as onnx_export
from export import tensorrt as trt_export

from .conftest import REPO, assert_clean_failure, assert_intact, snapshot

QUICK = ("--parts", "decoder", "--parity-batches", "1,3")


def tiny_run(root: Path, seed: int) -> Path:
    """A run directory whose last/ holds a tiny MLP VAE with weights from `seed`."""
    torch.manual_seed(seed)
    model = build_model("mlp", hidden_dims=(8,), latent_dim=2)
    ckpt.save(root / f"run{seed}" / "last", model.eval())
    return root / f"run{seed}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two checkpoints of the same config with other weights (fresh seeds per session), and
    an export of the first in root/export."""
    root = tmp_path_factory.mktemp("atomic")
    seeds = torch.randint(0, 2**31 - 1, (2,)).tolist()
    a, b = tiny_run(root, seeds[0]), tiny_run(root, seeds[1] + 1)
    assert onnx_export.main([str(a), "--out", str(root / "export"), *QUICK]) == 0
    return root, a, b


@pytest.fixture
def export_dir(runs, tmp_path):
    """A private copy of the first run's export (each test may break its own)."""
    root, _, _ = runs
    out = tmp_path / "export"
    out.mkdir()
    for p in (root / "export").iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    return out


def residue(parent: Path) -> list[str]:
    """What an export must never leave beside the export dir: swap halves, staging folders."""
    return sorted(p.name for p in parent.iterdir()
                  if p.name.endswith((".tmp", ".old")) or ".stage-" in p.name)


def agrees_with(export: Path, run: Path) -> bool:
    """The export dir samples like the eager checkpoint (the same seed draws the same z on the
    same device: CPU and CUDA generators differ)."""
    got = Sampler.load(export, device="cpu").sample(5, seed=3)
    ref = Sampler.load(run, device="cpu").sample(5, seed=3)
    return bool(torch.allclose(got, ref, atol=1e-4))


def test_a_failed_parity_check_keeps_the_previous_export(runs, export_dir, capsys,
                                                         monkeypatch):
    """Before: decoder.onnx was overwritten before parity ran; the manifest kept the old
    SHA-256, so the runtime refused the file and the good export was gone."""
    _, a, b = runs
    before = snapshot(export_dir.parent)
    monkeypatch.setitem(common.TOLERANCE, "fp32", -1.0)  # nothing can pass
    code = onnx_export.main([str(b), "--out", str(export_dir), *QUICK])
    assert_clean_failure(code, capsys.readouterr().err)
    assert_intact(export_dir.parent, before)
    assert residue(export_dir.parent) == []
    assert agrees_with(export_dir, a)


def test_a_failure_while_committing_leaves_the_previous_export(runs, export_dir, monkeypatch):
    """A full disk while the new directory is assembled (the manifest write fails): the old
    directory is untouched and the half-built `.tmp` is removed."""
    _, a, b = runs
    before = snapshot(export_dir.parent)

    def full(path, obj):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(manifest, "atomic_write_json", full)
    with pytest.raises(OSError, match="No space left"):
        onnx_export.export_onnx(b, export_dir, parts="decoder", batches=(1,))
    assert_intact(export_dir.parent, before)
    assert residue(export_dir.parent) == [] and agrees_with(export_dir, a)


def test_a_crash_between_the_two_renames_loads_a_verified_artifact(runs, export_dir,
                                                                    monkeypatch):
    """Killed after `export -> export.old`, before `export.tmp -> export`: the runtime loads the
    complete new copy, and the next export puts it in place and completes."""
    _, a, b = runs

    def first_rename_only(tmp, path, old):
        os.replace(path, old)
        raise KeyboardInterrupt  # stands for the SIGKILL: nothing after this line runs

    monkeypatch.setattr(manifest, "swap_into_place", first_rename_only)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(b, export_dir, parts="decoder", batches=(1,))
    monkeypatch.undo()
    assert not export_dir.exists() and manifest.complete(export_dir.with_name("export.tmp"))
    assert agrees_with(export_dir, b)  # the new export, verified against its manifest
    assert manifest.read(export_dir)["artifacts"]["decoder.onnx"]["source"]["checkpoint"] \
        == str(b / "last")
    assert onnx_export.main([str(a), "--out", str(export_dir), *QUICK]) == 0
    assert agrees_with(export_dir, a) and manifest.complete(export_dir)
    assert residue(export_dir.parent) == []


def test_a_crash_with_an_incomplete_tmp_falls_back_to_the_old_export(runs, export_dir):
    """Killed while `.tmp` was built, after the old dir was moved (not a real order, the worst
    case): the manifest of `.tmp` does not match its files, so `.old` is what loads."""
    _, a, _ = runs
    tmp, old = export_dir.with_name("export.tmp"), export_dir.with_name("export.old")
    tmp.mkdir()
    (tmp / "manifest.json").write_text((export_dir / "manifest.json").read_text())
    (tmp / "decoder.onnx").write_bytes(b"torn")
    export_dir.rename(old)
    assert manifest.settled(export_dir) == old and agrees_with(export_dir, a)


_COMMITTER = """
import os, sys
from pathlib import Path
from export import manifest
out, name, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for i in range(n):
    with manifest.staging(out) as stage:
        path = stage / name
        path.write_bytes(os.urandom(4096))
        entry = manifest.artifact_entry(path, name.split('.')[0], sys.argv[4], inputs=[],
                                        outputs=[], precision='fp32', device='cpu',
                                        settings={'i': i}, parity=None)
        manifest.commit(out, None, {name: (path, entry)})
"""


def test_concurrent_onnx_and_aoti_like_commits_both_survive(runs, export_dir):
    """Two processes commit other files into one export dir, several times each, while the
    first export's decoder.onnx stays: every file and entry survives, and all match."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _COMMITTER, str(export_dir), name, "6",
                               fmt], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
             for name, fmt in (("decoder.pt2", "aoti"), ("encoder.onnx", "onnx"))]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    data = manifest.read(export_dir)
    assert sorted(data["artifacts"]) == ["decoder.onnx", "decoder.pt2", "encoder.onnx"]
    assert {e["settings"].get("i") for n, e in data["artifacts"].items() if n != "decoder.onnx"} \
        == {5}
    assert manifest.complete(export_dir) and residue(export_dir.parent) == []
    assert agrees_with(export_dir, runs[1])


class FakeRunner:
    """TensorRTRunner's CPU-checkable half: reads and verifies the sidecar beside the engine."""

    def __init__(self, path):
        self.sidecar = trt_export.read_sidecar(Path(path))
        assert ckpt.sha256(Path(path)) == self.sidecar["engine_sha256"]
        self.batch_range = trt_export.batch_range(self.sidecar["profiles"])
        self._dtypes = {"z": torch.float32}


def _engine(export_dir, monkeypatch, parity_ok: bool) -> Path:
    """export.tensorrt.publish of a fake engine (fresh bytes) built from decoder.onnx."""
    monkeypatch.setattr(trt_export, "TensorRTRunner", FakeRunner)

    def parity(label, *args, **kwargs):
        if not parity_ok:
            raise common.ExportError(f"{label}: parity check failed: max_abs 1.0e+00")
        return {"passed": True, "max_abs": 0.0}

    monkeypatch.setattr(trt_export, "check_parity", parity)
    onnx_path = export_dir / "decoder.onnx"
    data = os.urandom(1000)
    profiles = trt_export.plan_profiles([("z", [-1, 2])], [(1, 8, 64)])
    sidecar = {"format": 1, "engine": "decoder.engine", "onnx": "decoder.onnx",
               "onnx_sha256": ckpt.sha256(onnx_path),
               "engine_sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
               "tensorrt": "10.0", "gpu": "fake",
               "compute_capability": "9.0", "precision": "fp32", "profiles": profiles,
               "batch_range": [1, 64], "workspace_gb": 1.0, "metadata": {}}
    return trt_export.publish(data, sidecar, export_dir / "decoder.engine", onnx_path, "fp32")


def test_a_tensorrt_engine_is_committed_with_its_sidecar_and_entry(export_dir, monkeypatch):
    engine = _engine(export_dir, monkeypatch, parity_ok=True)
    entry = manifest.read(export_dir)["artifacts"]["decoder.engine"]
    assert entry["format"] == "tensorrt" and entry["sha256"] == ckpt.sha256(engine)
    assert trt_export.read_sidecar(engine)["parity"]["passed"] is True
    assert manifest.complete(export_dir) and residue(export_dir.parent) == []


def test_a_failed_tensorrt_parity_check_moves_nothing(runs, export_dir, monkeypatch, capsys):
    """Before: the engine and its sidecar were written in place first, and the ExportError of a
    failed check escaped main() as a traceback."""
    before = snapshot(export_dir.parent)
    with pytest.raises(common.ExportError):
        _engine(export_dir, monkeypatch, parity_ok=False)
    assert_intact(export_dir.parent, before)
    assert residue(export_dir.parent) == [] and agrees_with(export_dir, runs[1])
    monkeypatch.setattr(trt_export, "build_engine",
                        lambda *a, **k: _engine(export_dir, monkeypatch, parity_ok=False))
    code = trt_export.main([str(export_dir / "decoder.onnx")])
    assert_clean_failure(code, capsys.readouterr().err)
    assert_intact(export_dir.parent, before)


def test_a_triton_model_dir_is_replaced_whole(export_dir, tmp_path, monkeypatch):
    """A failed copy leaves the old model dir as it was; a crash between the two renames is
    settled by the next write (before: `finally` deleted the moved-aside old model)."""
    repo = tmp_path / "repo"
    assert triton.main([str(export_dir), "--out", str(repo), "--name", "m"]) == 0
    before = snapshot(repo)
    config = (repo / "m" / "config.pbtxt").read_text()

    def full(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(triton.shutil, "copyfile", full)
    with pytest.raises(OSError):
        triton.export_triton(export_dir, repo, name="m", max_batch=8)
    assert_intact(repo, before)
    assert sorted(p.name for p in repo.iterdir()) == ["m"]
    monkeypatch.undo()

    def first_rename_only(tmp, path, old):
        os.replace(path, old)
        raise KeyboardInterrupt

    monkeypatch.setattr(triton, "swap_into_place", first_rename_only)
    with pytest.raises(KeyboardInterrupt):
        triton.export_triton(export_dir, repo, name="m", max_batch=8)
    monkeypatch.undo()
    assert not (repo / "m").exists()
    assert triton.main([str(export_dir), "--out", str(repo), "--name", "m"]) == 0
    assert (repo / "m" / "config.pbtxt").read_text() == config
    assert sorted(p.name for p in repo.iterdir()) == ["m"]


def test_a_resume_retires_an_export_a_crash_left_mid_swap(runs, export_dir, monkeypatch):
    """`engine.train --resume` moves the export aside (rundir.retire_export) even when a crash
    left it as `export.old` + `export.tmp`: the next export must not put it back beside the
    new checkpoints. `--overwrite` (clear_run) deletes both halves."""
    from engine.training.rundir import clear_run, retire_export

    _, a, b = runs

    def first_rename_only(tmp, path, old):
        os.replace(path, old)
        raise KeyboardInterrupt

    monkeypatch.setattr(manifest, "swap_into_place", first_rename_only)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(b, export_dir, parts="decoder", batches=(1,))
    monkeypatch.undo()
    moved = retire_export(export_dir.parent)
    assert moved is not None and agrees_with(moved, b) and residue(export_dir.parent) == []
    export_dir.with_name("export.tmp").mkdir()  # halves of another interrupted swap
    export_dir.with_name("export.old").mkdir()
    clear_run(export_dir.parent)
    assert residue(export_dir.parent) == [] and agrees_with(moved, b)
