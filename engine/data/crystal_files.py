"""Reading crystal files: CDVAE-format CSVs (one CIF per row in a `cif` column, plain or
gzipped) parsed with pymatgen into flat arrays, and cached as `.npz` (no pickle).

Each CIF is parsed, optionally Niggli-reduced, and rebuilt from its lattice parameters as in
CDVAE (so the lattice matrix is the canonical one of (a, b, c, alpha, beta, gamma)). The cache
lives under `cache_dir` / $VAE_CACHE_DIR / ~/.cache/vae-engine, keyed by the file's SHA-256 and
the processing options, and is written atomically. A row that does not parse becomes None and
is counted by the caller; nothing here raises on a bad row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data.atomic import replace_atomically

PROCESS_VERSION = 1  # bump when the processing changes: it is part of the cache key
CSV_SUFFIXES = (".csv", ".csv.gz")


@dataclass
class CrystalArrays:
    """Parsed crystals of one or more files, flat: crystal i owns atoms offsets[i]:offsets[i+1]."""

    atom_types: np.ndarray  # (T,) int64
    frac_coords: np.ndarray  # (T, 3) float64
    lengths: np.ndarray  # (M, 3) float64
    angles: np.ndarray  # (M, 3) float64
    num_atoms: np.ndarray  # (M,) int64
    row_index: np.ndarray  # (M,) int64: the row of the CSV each crystal came from
    bad_rows: np.ndarray  # (K,) int64: rows whose CIF could not be parsed

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.num_atoms)])

    def __len__(self) -> int:
        return len(self.num_atoms)

    def subset(self, keep: np.ndarray) -> CrystalArrays:
        """The crystals at indices `keep` (in that order)."""
        off = self.offsets
        atoms = (np.concatenate([np.arange(off[i], off[i + 1]) for i in keep])
                 if len(keep) else np.zeros(0, np.int64))
        return CrystalArrays(self.atom_types[atoms], self.frac_coords[atoms], self.lengths[keep],
                             self.angles[keep], self.num_atoms[keep], self.row_index[keep],
                             self.bad_rows)

    @staticmethod
    def concat(parts: list[CrystalArrays]) -> CrystalArrays:
        names = [f.name for f in dataclasses.fields(CrystalArrays)]
        return CrystalArrays(**{n: np.concatenate([getattr(p, n) for p in parts]) for n in names})


def parse_cif(cif: str, niggli: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CIF text -> (Z (n,), frac (n, 3) in [0, 1), lengths (3,), angles (3,)); raises on bad CIF."""
    from pymatgen.core import Lattice, Structure  # lazy: pymatgen is the optional crystal extra

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns on rounding of occupancies etc.
        s = Structure.from_str(cif, fmt="cif")
        if niggli:
            s = s.get_reduced_structure()
        s = Structure(Lattice.from_parameters(*s.lattice.parameters), s.species,
                      s.frac_coords, coords_are_cartesian=False)
    if not s.is_ordered or len(s) == 0:
        raise ValueError("disordered or empty structure")
    z = np.array([site.specie.Z for site in s], dtype=np.int64)
    return z, np.mod(s.frac_coords, 1.0), np.array(s.lattice.abc), np.array(s.lattice.angles)


def _parse_rows(args: tuple[list[str], bool]) -> list:
    cifs, niggli = args
    out = []
    for cif in cifs:
        try:
            out.append(parse_cif(cif, niggli))
        except Exception:  # noqa: BLE001 - any parse failure skips the row, and is counted
            out.append(None)
    return out


def _read_cifs(path: Path) -> list[str]:
    import pandas as pd  # lazy: comes with the crystal extra (pymatgen), slow to import

    try:
        frame = pd.read_csv(path)
    except (OSError, EOFError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise ValueError(f"{path}: cannot read it as a CDVAE-format CSV (truncated or corrupt?):"
                         f" {str(e).splitlines()[0]}; download or copy it again") from e
    if "cif" not in frame.columns:
        raise ValueError(f"{path}: expected a CDVAE-format CSV with a 'cif' column, found "
                         f"columns {list(frame.columns)}")
    return [c if isinstance(c, str) else "" for c in frame["cif"].tolist()]


def parse_file(path: Path, niggli: bool, num_workers: int = 1) -> CrystalArrays:
    """Parse every row of one CSV; unparseable rows go to `bad_rows`."""
    cifs = _read_cifs(path)
    chunks = [cifs[i:i + 256] for i in range(0, len(cifs), 256)]
    if num_workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(num_workers) as pool:
            results = [r for chunk in pool.map(_parse_rows, [(c, niggli) for c in chunks])
                       for r in chunk]
    else:
        results = [r for c in chunks for r in _parse_rows((c, niggli))]
    good = [(i, r) for i, r in enumerate(results) if r is not None]
    bad = np.array([i for i, r in enumerate(results) if r is None], dtype=np.int64)
    if not good:
        raise ValueError(f"{path}: none of its {len(cifs)} rows holds a CIF that parses")
    return CrystalArrays(
        atom_types=np.concatenate([r[0] for _, r in good]),
        frac_coords=np.concatenate([r[1] for _, r in good]),
        lengths=np.stack([r[2] for _, r in good]), angles=np.stack([r[3] for _, r in good]),
        num_atoms=np.array([len(r[0]) for _, r in good], dtype=np.int64),
        row_index=np.array([i for i, _ in good], dtype=np.int64), bad_rows=bad)


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("VAE_CACHE_DIR", Path.home() / ".cache" / "vae-engine"))


def _cache_path(path: Path, niggli: bool, cache_dir: Path) -> Path:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    digest.update(f"niggli={niggli};version={PROCESS_VERSION}".encode())
    name = path.name.replace(".csv.gz", "").replace(".csv", "")
    return cache_dir / "crystal" / f"{name}-{digest.hexdigest()[:20]}.npz"


def load_file(path: str | os.PathLike, niggli: bool = True, cache_dir=None,
              num_workers: int = 1) -> CrystalArrays:
    """Parsed arrays of one CSV, from the cache when its key (file hash + options) matches."""
    path = Path(path)
    cache = _cache_path(path, niggli, default_cache_dir(cache_dir))
    if cache.exists():
        with np.load(cache, allow_pickle=False) as data:
            return CrystalArrays(**{k: data[k] for k in data.files})
    arrays = parse_file(path, niggli, num_workers)
    cache.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(cache, lambda f: np.savez(f, **dataclasses.asdict(arrays)))
    return arrays
