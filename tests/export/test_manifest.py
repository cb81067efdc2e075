"""export.manifest: locked read-modify-write shared by the exporters."""

from __future__ import annotations

import threading

import pytest

from export import manifest


def _entry(tmp_path, name, fmt="onnx"):
    path = tmp_path / name
    path.write_bytes(name.encode())
    return manifest.artifact_entry(path, "decoder", fmt, inputs=[], outputs=[],
                                   precision="fp32", device="cpu", settings={}, parity=None)


def test_concurrent_updates_keep_every_entry(tmp_path):
    model = {"config": {"family": "mlp"}}
    names = [f"decoder{i}.onnx" for i in range(8)]
    entries = {n: _entry(tmp_path, n) for n in names}
    threads = [threading.Thread(target=manifest.update, args=(tmp_path, model, {n: entries[n]}))
               for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(manifest.read(tmp_path)["artifacts"]) == sorted(names)


def test_another_model_replaces_stale_entries(tmp_path, capsys):
    manifest.update(tmp_path, {"config": {"family": "mlp"}}, {"a.onnx": _entry(tmp_path, "a.onnx")})
    manifest.update(tmp_path, {"config": {"family": "conv"}}, {"b.pt2": _entry(tmp_path, "b.pt2")})
    data = manifest.read(tmp_path)
    assert list(data["artifacts"]) == ["b.pt2"] and data["model"]["config"]["family"] == "conv"
    assert "dropping its entries ['a.onnx']" in capsys.readouterr().err


def test_find_orders_by_format(tmp_path):
    manifest.update(tmp_path, {"config": {}}, {"d.pt2": _entry(tmp_path, "d.pt2", "aoti"),
                                              "d.onnx": _entry(tmp_path, "d.onnx")})
    found = manifest.find(manifest.read(tmp_path), "decoder", ("onnx", "aoti"))
    assert [f for f, _ in found] == ["d.onnx", "d.pt2"]


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
