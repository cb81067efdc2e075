"""CrystalBatch <-> pymatgen Structure, CIF writing and the CDVAE structural validity check.

pymatgen is imported lazily: `import engine.crystal` works without it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np

MIN_DISTANCE = 0.5  # angstrom: CDVAE's structure validity cutoff
MIN_VOLUME = 0.1  # angstrom^3


def crystal_arrays(batch) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per crystal (Z (n,), frac (n, 3), lengths (3,), angles (3,)) as float64 numpy arrays."""
    types = batch.atom_types.detach().cpu().numpy()
    frac = batch.frac_coords.detach().double().cpu().numpy()
    lengths = batch.lengths.detach().double().cpu().numpy()
    angles = batch.angles.detach().double().cpu().numpy()
    bounds = np.concatenate([[0], np.cumsum(batch.num_atoms.cpu().numpy())])
    return [(types[s:e], frac[s:e], lengths[i], angles[i])
            for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))]


def make_structure(z: np.ndarray, frac: np.ndarray, lengths: np.ndarray, angles: np.ndarray):
    """A pymatgen Structure, or None when the lattice or the species are not physical."""
    from pymatgen.core import Lattice, Structure

    if len(z) == 0 or not (np.all(np.isfinite(lengths)) and np.all(np.isfinite(angles))):
        return None
    if np.any(lengths <= 0) or np.any(angles <= 0) or np.any(angles >= 180) or np.any(z < 1):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lattice = Lattice.from_parameters(*lengths, *angles)
            if not np.isfinite(lattice.volume) or lattice.volume <= 0:
                return None
            return Structure(lattice, [int(v) for v in z], frac, coords_are_cartesian=False)
    except Exception:  # noqa: BLE001 - e.g. angles that admit no cell, unknown Z
        return None


def batch_to_structures(batch) -> list:
    """One Structure (or None where the prediction is not a valid cell) per crystal."""
    return [make_structure(*a) for a in crystal_arrays(batch)]


def is_valid(structure) -> bool:
    """CDVAE structure validity: a cell exists, volume >= 0.1 A^3, all pair distances >= 0.5 A."""
    if structure is None:
        return False
    try:
        if structure.volume < MIN_VOLUME:
            return False
        if len(structure) < 2:
            return True
        dist = structure.distance_matrix + np.eye(len(structure)) * (MIN_DISTANCE + 10.0)
        return bool(dist.min() >= MIN_DISTANCE)
    except Exception:  # noqa: BLE001 - degenerate lattices make pymatgen raise
        return False


def write_cifs(structures: list, out_dir: Path, prefix: str) -> list[Path]:
    """Write each Structure to out_dir/{prefix}_{i:04d}.cif, atomically. None entries and
    structures pymatgen cannot describe are skipped; a failed write (a full or read-only disk)
    raises an OSError naming the file, rather than being skipped as well."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, s in enumerate(structures):
        text = cif_text(s)
        if text is None:
            continue
        path = out_dir / f"{prefix}_{i:04d}.cif"
        _write_text_atomic(path, text)
        written.append(path)
    return written


def _write_text_atomic(path: Path, text: str) -> None:
    """Temp file beside `path`, then rename; on failure the temp file goes and the OSError
    names `path`. (engine.checkpoint.atomic_write does the same, but importing it here would
    close an import cycle through engine.models.)"""
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e


def cif_text(structure) -> str | None:
    """The CIF of a Structure, or None (no structure, or one pymatgen cannot describe)."""
    from pymatgen.io.cif import CifWriter

    if structure is None:
        return None
    try:
        return str(CifWriter(structure))
    except Exception:  # noqa: BLE001 - a degenerate prediction must not stop the run
        return None
