"""Checkpoints: round trip, self-containment, corruption and crash safety, no pickle."""

from __future__ import annotations

import json
import os

import pytest
import torch

from engine import checkpoint as ckpt
from engine.models import build_model


def saved(tmp_path, family="conv", **kw):
    model = build_model(family, **kw)
    return model, ckpt.save(tmp_path / "last", model, extra_state={"step": 7})


def test_round_trip_rebuilds_the_model_from_the_directory_alone(tmp_path):
    model, path = saved(tmp_path, hidden_dims=(8, 16), latent_dim=5)
    loaded, c = ckpt.load_model(tmp_path)  # a run dir resolves to last/
    assert c.step == 7 and c.path == path
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(loaded.reconstruct(x), model.eval().reconstruct(x))


def test_optimizer_state_survives_json_plus_safetensors(tmp_path):
    model = build_model("mlp", hidden_dims=(8,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.rand(2, 1, 28, 28)).recon_logits.sum().backward()
    opt.step()
    tensors = {}
    state = ckpt.split_state(opt.state_dict(), "optimizer", tensors)
    ckpt.save(tmp_path / "c", model, extra_state={"optimizer": state}, extra_tensors=tensors)
    c = ckpt.read(tmp_path / "c")
    restored = ckpt.optimizer_state_from_json(c.state["optimizer"],
                                              ckpt.read_tensors(c, "state.safetensors"))
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(restored)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_or_truncated_checkpoint_gives_one_clear_error(tmp_path, damage):
    _, path = saved(tmp_path, family="mlp", hidden_dims=(8,))
    target = path / "model.safetensors"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 3])
    elif damage == "flip":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        target.unlink()
    with pytest.raises(ckpt.CheckpointError, match="corrupt|incomplete") as err:
        ckpt.load_model(path)
    assert "\n" not in str(err.value)


def test_garbage_json_is_reported(tmp_path):
    _, path = saved(tmp_path, family="mlp", hidden_dims=(8,))
    (path / "state.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="not valid JSON"):
        ckpt.read(path)


def test_weights_of_another_model_are_rejected(tmp_path):
    _, path = saved(tmp_path, family="mlp", hidden_dims=(8,))
    other = build_model("mlp", hidden_dims=(16,))
    with pytest.raises(ckpt.CheckpointError, match="does not fit this MLPVAE"):
        ckpt.load_weights(other, ckpt.read_tensors(ckpt.read(path), "model.safetensors"), path)


def test_missing_checkpoint_says_what_was_expected(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="expected a run directory"):
        ckpt.resolve(tmp_path / "nothing")


def test_crash_between_renames_leaves_a_complete_old_checkpoint(tmp_path):
    model, path = saved(tmp_path, family="mlp", hidden_dims=(8,))
    # simulate a kill after `last` was moved to `last.old` but before `last.tmp` took its place
    os.replace(path, tmp_path / "last.old")
    (tmp_path / "last.tmp").mkdir()
    (tmp_path / "last.tmp" / "model.safetensors").write_bytes(b"half")
    loaded, c = ckpt.load_model(tmp_path)
    assert c.path.name == "last.old" and c.step == 7


def test_checkpoint_files_are_safetensors_and_json_only(tmp_path):
    _, path = saved(tmp_path, family="mlp", hidden_dims=(8,))
    for f in path.iterdir():
        head = f.read_bytes()[:2]
        assert f.suffix in (".json", ".safetensors") and head != b"\x80\x04", f  # no pickle
    assert json.loads((path / "config.json").read_text())["model"]["family"] == "mlp"


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_weights_are_refused_on_load(tmp_path, bad):
    model, path = saved(tmp_path, family="mlp", hidden_dims=(8,))
    names = [k for k, t in model.state_dict().items() if t.is_floating_point()]
    name = names[int(torch.randint(len(names), ()))]
    with torch.no_grad():
        model.state_dict()[name].view(-1)[0] = float(bad)
    ckpt.save(path, model)
    with pytest.raises(ckpt.CheckpointError, match=rf"holds NaN or inf in 1 tensor\(s\) \(first:"
                                                   rf" {name}\).*earlier checkpoint"):
        ckpt.load_model(path)
