"""Data pipeline: CIF -> CrystalBatch -> Structure round trip, bad rows, cache, split mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.crystal.structures import batch_to_structures
from engine.data.crystal_files import load_file, parse_cif
from engine.data.crystals import CrystalDataset, build_crystal_data


def _matcher():
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)


@pytest.mark.parametrize("niggli", [False, True])
def test_round_trip_preserves_structure(random_structure, to_cif, write_csv, tmp_path, niggli):
    structures = [random_structure(n) for n in (1, 2, 3, 5, 8, 8)]
    path = write_csv("x.csv", [to_cif(s) for s in structures])
    arrays = load_file(path, niggli=niggli, cache_dir=tmp_path / "cache")
    batch = CrystalDataset(arrays, pad_to=10).collate(np.arange(len(arrays)))
    back = batch_to_structures(batch)
    matcher = _matcher()
    for original, rebuilt in zip(structures, back):
        assert rebuilt.composition == original.composition
        assert matcher.fit(original, rebuilt)
        rms = matcher.get_rms_dist(original, rebuilt)[0]
        assert rms < 1e-4, f"round trip moved atoms: normalised rms {rms}"
        assert abs(rebuilt.volume - original.volume) < 1e-3 * original.volume
    # dense and flat forms agree
    assert torch.equal(batch.dense_types[batch.mask], batch.atom_types)
    assert torch.allclose(batch.dense_frac[batch.mask], batch.frac_coords)
    assert torch.equal(batch.mask.sum(1), batch.num_atoms)


def test_translation_augment_keeps_structure(rng, random_structure, to_cif, write_csv, tmp_path):
    structures = [random_structure(4) for _ in range(3)]
    arrays = load_file(write_csv("t.csv", [to_cif(s) for s in structures]), niggli=False,
                       cache_dir=tmp_path)
    shift = rng.random((3, 3))
    batch = CrystalDataset(arrays, pad_to=4).collate(np.arange(3), shift)
    assert not torch.allclose(batch.frac_coords, torch.from_numpy(arrays.frac_coords).float())
    assert float(batch.frac_coords.min()) >= 0 and float(batch.frac_coords.max()) < 1
    for original, moved in zip(structures, batch_to_structures(batch)):
        assert _matcher().fit(original, moved)


def test_corrupt_rows_skipped_and_counted(random_structure, to_cif, write_csv, tmp_path):
    good = [to_cif(random_structure(int(n))) for n in (2, 3, 4, 5)]
    big = to_cif(random_structure(7))
    cifs = [good[0], "data_broken\n_cell_length_a  oops\n", good[1], big, "", good[2], good[3]]
    path = write_csv("bad.csv.gz", cifs)
    arrays = load_file(path, niggli=False, cache_dir=tmp_path / "cache")
    assert arrays.bad_rows.tolist() == [1, 4]
    assert arrays.row_index.tolist() == [0, 2, 3, 5, 6]
    bundle = build_crystal_data(str(path), batch_size=2, max_atoms=6, seed=0, num_workers=0,
                                niggli=False, augment_translate=False, cache_dir=tmp_path / "c2")
    skipped = bundle.info["skipped"]
    assert sum(skipped["bad_cif"].values()) == 2
    assert sum(skipped["too_many_atoms"].values()) == 1
    assert sum(bundle.info["sizes"].values()) == 4
    assert bundle.info["max_atoms"] <= 6


def test_cache_is_npz_and_reused(random_structure, to_cif, write_csv, tmp_path, monkeypatch):
    path = write_csv("c.csv", [to_cif(random_structure(3)) for _ in range(3)])
    cache = tmp_path / "cache"
    first = load_file(path, niggli=True, cache_dir=cache)
    files = list((cache / "crystal").glob("*.npz"))
    assert len(files) == 1 and not list((cache / "crystal").glob("*.tmp"))
    np.load(files[0], allow_pickle=False).close()  # loads without pickle

    def fail(*a, **k):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr("engine.data.crystal_files.parse_file", fail)
    second = load_file(path, niggli=True, cache_dir=cache)
    np.testing.assert_array_equal(first.frac_coords, second.frac_coords)
    monkeypatch.setenv("VAE_CACHE_DIR", str(tmp_path / "other"))
    with pytest.raises(AssertionError, match="cache was not used"):
        load_file(path, niggli=True)  # a different cache dir: must parse again


def test_parse_cif_rejects_garbage():
    with pytest.raises(Exception):  # noqa: B017 - any pymatgen error
        parse_cif("not a cif at all", niggli=False)


def test_loader_epochs_and_lengths(random_structure, to_cif, write_csv, tmp_path):
    path = write_csv("l.csv", [to_cif(random_structure(2)) for _ in range(20)])
    bundle = build_crystal_data(str(path), batch_size=4, max_atoms=4, seed=3, num_workers=0,
                                niggli=False, augment_translate=True, cache_dir=tmp_path)
    train = bundle.train
    assert len(train) == bundle.info["sizes"]["train"] // 4
    train.set_epoch(0)
    a = [b.lengths for b in train]
    train.set_epoch(1)
    b = [b.lengths for b in train]
    train.set_epoch(0)
    c = [b.lengths for b in train]
    assert len(a) == len(train)
    assert all(torch.equal(x, y) for x, y in zip(a, c))
    assert not all(torch.equal(x, y) for x, y in zip(a, b))
    assert bundle.info["model_overrides"]["num_atoms_hist"][2] == 1.0


@pytest.mark.slow  # parses all 7,572 Perov-5 CIFs (~20 s on 2 cores)
def test_perov_directory_split_mapping(data_dir, tmp_path):
    if not (data_dir / "perov_5" / "val.csv.gz").exists():
        pytest.skip(f"Perov-5 not found under {data_dir}: set VAE_DATA_DIR to the datasets")
    bundle = build_crystal_data(str(data_dir / "perov_5"), batch_size=512, max_atoms=20, seed=0,
                                num_workers=1, niggli=True, augment_translate=False,
                                cache_dir=tmp_path)
    assert bundle.info["splits"]["test"] == "test.csv.gz"
    assert bundle.info["splits"]["train"].startswith("val.csv.gz")
    assert bundle.info["sizes"]["train"] + bundle.info["sizes"]["val"] == 3787
    assert bundle.info["sizes"]["test"] == 3785
    assert bundle.info["max_atoms"] == 5


def test_missing_split_is_a_dataset_error_with_a_fix(tmp_path):
    from engine.data import DatasetError
    from engine.data.crystals import build_crystal_data

    (tmp_path / "val.csv").write_text("cif\n")
    with pytest.raises(DatasetError, match="no test.csv or test.csv.gz.*comma-separated"):
        build_crystal_data(str(tmp_path), batch_size=4, cache_dir=tmp_path / "cache")
    with pytest.raises(DatasetError, match="missing:"):
        build_crystal_data(str(tmp_path / "nope.csv"), batch_size=4, cache_dir=tmp_path / "c")
