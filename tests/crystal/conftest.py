"""Fixtures of the crystal tests: random crystals, CIF text, CSV files and the data dir.

(Plain helpers are fixtures too: pytest runs with --import-mode=importlib, so test modules
cannot import from each other.)"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymatgen")

DATA_DIR = Path(os.environ.get("VAE_DATA_DIR",
                               Path(__file__).resolve().parents[3] / "shared" / "datasets"))


def _random_structure(rng: np.random.Generator, n_atoms: int):
    """A random ordered crystal with atoms at least ~1 A apart (rejection sampling)."""
    from pymatgen.core import Lattice, Structure

    lengths = rng.uniform(3.5, 7.0, 3)
    angles = rng.uniform(75, 105, 3)
    lattice = Lattice.from_parameters(*lengths, *angles)
    species = [int(z) for z in rng.integers(1, 84, n_atoms)]
    coords: list[np.ndarray] = []
    while len(coords) < n_atoms:
        f = rng.random(3)
        if all(lattice.get_distance_and_image(f, c)[0] > 1.0 for c in coords):
            coords.append(f)
    return Structure(lattice, species, np.array(coords))


def _to_cif(structure) -> str:
    from pymatgen.io.cif import CifWriter

    return str(CifWriter(structure))


@pytest.fixture
def rng(_seed_everything) -> np.random.Generator:
    return np.random.default_rng(_seed_everything)


@pytest.fixture
def random_structure(rng):
    """random_structure(n_atoms) -> a fresh random pymatgen Structure."""
    return lambda n_atoms: _random_structure(rng, n_atoms)


@pytest.fixture
def to_cif():
    return _to_cif


@pytest.fixture
def data_dir() -> Path:
    """$VAE_DATA_DIR, else the repository's ../shared/datasets."""
    return DATA_DIR


@pytest.fixture
def write_csv(tmp_path):
    """write_csv(name, cifs) -> path of a CDVAE-format CSV (gzipped when name ends in .gz)."""
    import pandas as pd

    def write(name: str, cifs: list[str]) -> Path:
        path = tmp_path / name
        pd.DataFrame({"material_id": range(len(cifs)), "cif": cifs}).to_csv(path)
        return path

    return write
