"""Checkpoint faults: nothing loads unverified, and an interrupted save never costs the only
good copy."""

from __future__ import annotations

import json
import os

import pytest

from engine import checkpoint as ckpt
from engine.models import build_model


def saved(tmp_path, step: int = 7):
    model = build_model("mlp", hidden_dims=(8,), latent_dim=2)
    return model, ckpt.save(tmp_path / "last", model, extra_state={"step": step})


@pytest.mark.parametrize("edit", ["drop", "empty", "partial"])
def test_a_state_json_without_hashes_is_refused(tmp_path, edit):
    _, path = saved(tmp_path)
    state = json.loads((path / "state.json").read_text())
    if edit == "drop":
        del state["sha256"]
    elif edit == "empty":
        state["sha256"] = {}
    else:
        del state["sha256"]["config.json"]
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(ckpt.CheckpointError, match="SHA-256"):
        ckpt.load_model(path)


def test_save_after_a_crash_mid_swap_keeps_the_newest_copy(tmp_path):
    model, path = saved(tmp_path, step=7)
    ckpt.save(tmp_path / "new", model, extra_state={"step": 9})
    os.replace(path, tmp_path / "last.old")        # killed after the first rename...
    os.replace(tmp_path / "new", tmp_path / "last.tmp")  # ...with the new copy complete
    assert ckpt.read(tmp_path).step == 9
    ckpt.save(path, model, extra_state={"step": 11})
    assert ckpt.read(path).step == 11
    assert not (tmp_path / "last.tmp").exists() and not (tmp_path / "last.old").exists()


def test_an_incomplete_tmp_falls_back_to_old(tmp_path):
    model, path = saved(tmp_path, step=7)
    os.replace(path, tmp_path / "last.old")
    (tmp_path / "last.tmp").mkdir()
    (tmp_path / "last.tmp" / "state.json").write_text('{"sha256": {"model.safetensors": "0"}}')
    assert ckpt.read(tmp_path).step == 7
    ckpt.save(path, model, extra_state={"step": 8})  # puts last.old back, then replaces it
    assert ckpt.read(path).step == 8
