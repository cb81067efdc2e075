"""export.manifest: staged artifacts committed with the manifest at once, shared by the
exporters."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from export import manifest


def _staged(stage, name, fmt="onnx", data=None):
    """(staged path, entry) of a file `name` holding `data` (fresh random bytes by default)."""
    stage.mkdir(parents=True, exist_ok=True)
    path = stage / name
    path.write_bytes(os.urandom(64) if data is None else data)
    entry = manifest.artifact_entry(path, "decoder", fmt, inputs=[], outputs=[],
                                    precision="fp32", device="cpu", settings={}, parity=None)
    return path, entry


def test_concurrent_commits_keep_every_file_and_entry(tmp_path):
    model, out = {"config": {"family": "mlp"}}, tmp_path / "export"
    names = [f"decoder{i}.onnx" for i in range(8)]
    files = {n: _staged(tmp_path / f"stage{i}", n) for i, n in enumerate(names)}
    data = {n: files[n][0].read_bytes() for n in names}
    threads = [threading.Thread(target=manifest.commit, args=(out, model, {n: files[n]}))
               for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(manifest.read(out)["artifacts"]) == sorted(names)
    assert {n: (out / n).read_bytes() for n in names} == data
    assert manifest.complete(out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("export")) == ["export"]


def test_another_model_replaces_stale_entries(tmp_path, capsys):
    manifest.commit(tmp_path / "e", {"config": {"family": "mlp"}},
                    {"a.onnx": _staged(tmp_path / "s1", "a.onnx")})
    manifest.commit(tmp_path / "e", {"config": {"family": "conv"}},
                    {"b.pt2": _staged(tmp_path / "s2", "b.pt2")})
    data = manifest.read(tmp_path / "e")
    assert list(data["artifacts"]) == ["b.pt2"] and data["model"]["config"]["family"] == "conv"
    assert "dropping its entries ['a.onnx']" in capsys.readouterr().err


def test_find_orders_by_format(tmp_path):
    manifest.commit(tmp_path / "e", {"config": {}},
                    {"d.pt2": _staged(tmp_path / "s", "d.pt2", "aoti"),
                     "d.onnx": _staged(tmp_path / "s", "d.onnx")})
    found = manifest.find(manifest.read(tmp_path / "e"), "decoder", ("onnx", "aoti"))
    assert [f for f, _ in found] == ["d.onnx", "d.pt2"]


def test_commit_keeps_other_files_and_never_touches_the_old_inodes(tmp_path):
    """The new directory is a hard-link copy: files the commit does not replace (a subfolder,
    a note) are carried over, and the old directory's files keep their bytes even when a new
    file of the same name arrives (renamed over the link, not written into it)."""
    out = tmp_path / "export"
    manifest.commit(out, {"config": {}}, {"d.onnx": _staged(tmp_path / "s1", "d.onnx")})
    (out / "triton" / "1").mkdir(parents=True)
    (out / "triton" / "1" / "model.onnx").write_bytes(b"m")
    (out / "notes.txt").write_text("mine")
    new_path, new_entry = _staged(tmp_path / "s2", "d.onnx")
    new = new_path.read_bytes()
    with open(out / "d.onnx", "rb") as held:  # a reader holding the old file open
        old = held.read()
        held.seek(0)
        manifest.commit(out, None, {"d.onnx": (new_path, new_entry)})
        assert (out / "d.onnx").read_bytes() == new != old and held.read() == old
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "triton" / "1" / "model.onnx").read_bytes() == b"m"
    assert manifest.read(out)["artifacts"]["d.onnx"]["sha256"] == new_entry["sha256"]


def test_a_folder_of_other_files_or_a_mount_point_is_refused(tmp_path, monkeypatch):
    """A commit replaces its directory whole: `--out .` (a folder of other files) or a mount
    point must be refused before anything moves."""
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(manifest.ManifestError, match="not an export directory"):
        manifest.commit(tmp_path, {"config": {}}, {"d.onnx": _staged(tmp_path / "s", "d.onnx")})
    with pytest.raises(manifest.ManifestError, match="not an export directory"), \
            manifest.staging(tmp_path):
        pass
    monkeypatch.setattr(manifest.os.path, "ismount", lambda p: str(p).endswith("mnt"))
    with pytest.raises(manifest.ManifestError, match="mount point"), \
            manifest.staging(tmp_path / "mnt"):
        pass
    assert (tmp_path / "mine.txt").read_text() == "x" and (tmp_path / "s" / "d.onnx").exists()


def test_staging_is_removed_and_dead_processes_stages_are_swept(tmp_path):
    out = tmp_path / "export"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / f".export.stage-{dead}-abc").mkdir()          # a SIGKILLed exporter's
    (tmp_path / f".export.stage-{os.getppid()}-abc").mkdir()  # a live process's: kept
    with pytest.raises(RuntimeError), manifest.staging(out) as stage:
        (stage / "d.onnx").write_bytes(b"x")
        raise RuntimeError("parity failed")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [f".export.stage-{os.getppid()}-abc"], left


def test_bad_manifests(tmp_path):
    assert manifest.read(tmp_path) == {"format": 1, "model": None, "artifacts": {}}
    with pytest.raises(manifest.ManifestError, match="no manifest.json"):
        manifest.read(tmp_path, missing_ok=False)
    (tmp_path / "manifest.json").write_text("[")
    with pytest.raises(manifest.ManifestError, match="not valid JSON"):
        manifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": 99}')
    with pytest.raises(manifest.ManifestError, match="expected manifest format 1, got 99"):
        manifest.read(tmp_path)


def test_a_symlinked_export_dir_stays_a_link_to_the_committed_folder(tmp_path):
    """`run/export -> /data/export`: the commit replaces the folder the link points at, beside
    it (same filesystem as its staging), and the link keeps working."""
    (tmp_path / "data").mkdir()
    (tmp_path / "run").mkdir()
    link = tmp_path / "run" / "export"
    link.symlink_to(tmp_path / "data" / "export")
    for _ in range(2):
        with manifest.staging(link) as stage:
            assert stage.parent == tmp_path / "data"
            path, entry = _staged(stage, "d.onnx")
            manifest.commit(link, {"config": {}}, {"d.onnx": (path, entry)})
        assert link.is_symlink() and manifest.complete(link)
        assert manifest.read(link)["artifacts"]["d.onnx"]["sha256"] == entry["sha256"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [".export.lock", "export"]
