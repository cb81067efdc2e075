"""StructureMatcher metrics, validity and the evaluation entry point."""

from __future__ import annotations

import json

import numpy as np
import torch

from engine.crystal.evaluate import evaluate_crystal
from engine.crystal.metrics import match_structures, summarize
from engine.crystal.structures import is_valid, make_structure
from engine.data.crystals import build_crystal_data
from engine.models import build_model


def _arrays(s):
    return (np.array([site.specie.Z for site in s]), s.frac_coords, np.array(s.lattice.abc),
            np.array(s.lattice.angles))


def test_match_rate_counts_invalid_as_miss(random_structure, rng):
    gts = [random_structure(n) for n in (2, 3, 4, 4)]
    preds = [_arrays(s) for s in gts]
    z, frac, lengths, angles = preds[1]
    preds[1] = (z, frac + rng.normal(0, 0.01, frac.shape), lengths * 1.02, angles)  # close
    z, frac, lengths, angles = preds[2]
    frac = frac.copy()
    frac[1] = frac[0] + 1e-3  # two atoms on top of each other: invalid
    preds[2] = (z, frac, lengths, angles)
    preds[3] = None  # no prediction (e.g. a degenerate lattice)
    results = match_structures(preds, [_arrays(s) for s in gts], num_workers=1, timeout=10)
    assert [r.matched for r in results] == [True, True, False, False]
    assert [r.valid for r in results] == [True, True, False, False]
    assert results[0].rms < 1e-6 < results[1].rms < 0.1
    summary = summarize(results)
    assert summary["match_rate"] == 0.5
    assert np.isclose(summary["rmse"], (results[0].rms + results[1].rms) / 2)


def test_validity_rules():
    ok = make_structure(np.array([11, 17]), np.array([[0, 0, 0], [0.5, 0.5, 0.5]]),
                        np.array([5.6, 5.6, 5.6]), np.array([90.0, 90.0, 90.0]))
    assert is_valid(ok)
    tiny = make_structure(np.array([6]), np.zeros((1, 3)), np.array([0.3, 0.3, 0.3]),
                          np.array([90.0, 90.0, 90.0]))
    assert not is_valid(tiny)  # volume 0.027 A^3 < 0.1
    assert make_structure(np.array([6]), np.zeros((1, 3)), np.array([-1.0, 2, 2]),
                          np.array([90.0, 90, 90])) is None


def test_evaluate_crystal_end_to_end(random_structure, to_cif, write_csv, tmp_path):
    path = write_csv("e.csv", [to_cif(random_structure(n)) for n in (2, 3, 4) * 8])
    data = build_crystal_data(str(path), batch_size=8, max_atoms=4, seed=0, num_workers=0,
                              niggli=True, augment_translate=False, cache_dir=tmp_path / "c",
                              drop_last=False)
    model = build_model("crystal", d_model=32, num_heads=2, num_layers=1,
                        **data.info["model_overrides"])
    metrics = evaluate_crystal(model, data, tmp_path / "out", split="train", num_workers=2,
                               timeout=10, num_samples=6)
    rec = metrics["reconstruction"]
    assert rec["pairs"] == data.info["sizes"]["train"]
    assert 0 <= rec["match_rate"] <= rec["valid_fraction"] <= 1
    assert metrics["sampling"]["num_samples"] == 6
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["split"] == "train"
    assert len(list((tmp_path / "out" / "recon").glob("input_*.cif"))) == rec["pairs"]
    assert model.training  # restored
    model.epoch_artifacts(next(iter(data.train)), tmp_path / "run", epoch=3)
    assert list((tmp_path / "run" / "recon" / "epoch_003").glob("input_*.cif"))
    assert torch.is_tensor(model.num_atoms_hist)
