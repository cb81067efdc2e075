"""Crystal datasets in the CDVAE CSV format (Perov-5, Carbon-24, MP-20) for the crystal VAE.

    bundle = build_crystal_data("path/to/perov_5", batch_size=256, max_atoms=20, seed=0,
                                num_workers=2, niggli=True, augment_translate=True)
    for batch in bundle.train:            # CrystalBatch
        loss, parts = model.training_loss(batch, objective, weight)

A CSV has one crystal per row in its `cif` column (plain `.csv` or `.csv.gz`); reading,
parsing and the `.npz` cache live in engine.data.crystal_files.

Rows whose CIF does not parse, and rows with more atoms than `max_atoms`, are skipped and
counted in `bundle.info["skipped"]`; nothing here raises on a bad row.

Split mapping (reported in `bundle.info["splits"]`):
  directory with train/val/test.csv[.gz]: train -> train, val -> val, test -> test.
  directory without train (Perov-5, Carbon-24 here): train -> 95% of val.csv, val -> the other
      5% (held out deterministically), test -> test.csv. `train_split` / `eval_split` pick
      other files by name (e.g. train_split="test", eval_split="val").
  single file or comma-separated files: rows concatenated and split 90/5/5 by a permutation
      with a fixed seed (0), independent of the training seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from engine.data.crystal_files import CSV_SUFFIXES, CrystalArrays, load_file
from engine.data.images import DataBundle, DatasetError

SPLIT_SEED = 0  # seed of the deterministic split of single files / holdouts
HOLDOUT_FRACTION = 0.05


# --- the batch --------------------------------------------------------------------------------
@dataclass
class CrystalBatch:
    """A batch of crystals, flat (per atom, PyG style) and padded (per crystal, dense).

    atom_types:     (T,) int64 atomic numbers Z >= 1, T = total atoms in the batch
    frac_coords:    (T, 3) float32 fractional coordinates in [0, 1)
    batch:          (T,) int64 index of the crystal each atom belongs to
    lengths:        (B, 3) float32 lattice lengths a, b, c in angstrom
    angles:         (B, 3) float32 lattice angles alpha, beta, gamma in degrees
    scaled_lengths: (B, 3) lengths / num_atoms^(1/3)
    num_atoms:      (B,) int64
    dense_types:    (B, N) int64 atomic numbers, 0 at padding; N = the padded size
    dense_frac:     (B, N, 3) float32 fractional coordinates, 0 at padding
    mask:           (B, N) bool, True on real atoms (the first num_atoms slots of each row)
    """

    atom_types: Tensor
    frac_coords: Tensor
    batch: Tensor
    lengths: Tensor
    angles: Tensor
    scaled_lengths: Tensor
    num_atoms: Tensor
    dense_types: Tensor
    dense_frac: Tensor
    mask: Tensor

    @property
    def num_crystals(self) -> int:
        return int(self.num_atoms.shape[0])

    def __len__(self) -> int:
        return self.num_crystals

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CrystalBatch:
        return CrystalBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                               for f in dataclasses.fields(self)})

    @classmethod
    def from_dense(cls, dense_types: Tensor, dense_frac: Tensor, lengths: Tensor,
                   angles: Tensor, mask: Tensor) -> CrystalBatch:
        """Build a batch from the padded form (e.g. decoder outputs); mask must be a prefix."""
        num_atoms = mask.sum(1).long()
        flat = mask.reshape(-1)
        idx = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)
        return cls(
            atom_types=dense_types.reshape(-1)[flat].long(),
            frac_coords=dense_frac.reshape(-1, 3)[flat].float(),
            batch=idx.reshape(-1)[flat],
            lengths=lengths.float(), angles=angles.float(),
            scaled_lengths=lengths.float() / num_atoms.clamp(min=1)[:, None].float() ** (1 / 3),
            num_atoms=num_atoms, dense_types=torch.where(mask, dense_types.long(), 0),
            dense_frac=torch.where(mask[..., None], dense_frac.float(), 0.0), mask=mask.bool())


# --- dataset and loader -----------------------------------------------------------------------
class CrystalDataset:
    """Crystals held as flat numpy arrays; `collate(indices)` builds a CrystalBatch."""

    def __init__(self, arrays: CrystalArrays, pad_to: int) -> None:
        if len(arrays) and int(arrays.num_atoms.max()) > pad_to:
            raise ValueError(f"a crystal has {int(arrays.num_atoms.max())} atoms but the padded "
                             f"size is {pad_to}: filter with max_atoms first")
        self.arrays, self.pad_to, self.offsets = arrays, pad_to, arrays.offsets

    def __len__(self) -> int:
        return len(self.arrays)

    def collate(self, indices: np.ndarray, shift: np.ndarray | None = None) -> CrystalBatch:
        """Batch of crystals `indices`; `shift` (B, 3) is added to fractional coords mod 1."""
        a, off = self.arrays, self.offsets
        n = a.num_atoms[indices]
        atoms = np.concatenate([np.arange(off[i], off[i + 1]) for i in indices])
        crystal = np.repeat(np.arange(len(indices)), n)
        frac = a.frac_coords[atoms]
        if shift is not None:
            frac = np.mod(frac + shift[crystal], 1.0)
        slot = np.arange(len(atoms)) - np.repeat(np.cumsum(n) - n, n)  # position inside crystal
        dense_types = np.zeros((len(indices), self.pad_to), np.int64)
        dense_frac = np.zeros((len(indices), self.pad_to, 3), np.float32)
        dense_types[crystal, slot] = a.atom_types[atoms]
        dense_frac[crystal, slot] = frac
        lengths = a.lengths[indices]
        return CrystalBatch(
            atom_types=torch.from_numpy(a.atom_types[atoms].astype(np.int64)),
            frac_coords=torch.from_numpy(frac.astype(np.float32)),
            batch=torch.from_numpy(crystal.astype(np.int64)),
            lengths=torch.from_numpy(lengths.astype(np.float32)),
            angles=torch.from_numpy(a.angles[indices].astype(np.float32)),
            scaled_lengths=torch.from_numpy((lengths / n[:, None] ** (1 / 3)).astype(np.float32)),
            num_atoms=torch.from_numpy(n.astype(np.int64)),
            dense_types=torch.from_numpy(dense_types), dense_frac=torch.from_numpy(dense_frac),
            mask=torch.from_numpy(np.arange(self.pad_to)[None] < n[:, None]))


class CrystalLoader:
    """Iterable of CrystalBatch with `__len__` and `set_epoch`; shuffling is seeded per epoch."""

    def __init__(self, dataset: CrystalDataset, batch_size: int, shuffle: bool, seed: int,
                 drop_last: bool = False, augment_translate: bool = False, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.seed, self.drop_last, self.augment_translate = seed, drop_last, augment_translate
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def _num_items(self) -> int:
        """Crystals this rank sees per epoch (every rank the same number, as DDP needs)."""
        return len(self.dataset) // self.world_size if self.world_size > 1 else len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = self._num_items()
        if self.drop_last and n >= self.batch_size:
            return n // self.batch_size
        return -(-n // self.batch_size)

    def __iter__(self) -> Iterator[CrystalBatch]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.dataset)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.world_size > 1:  # the same permutation on every rank; each takes a stride
            order = order[self.rank::self.world_size][:self._num_items()]
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            shift = rng.random((len(idx), 3)) if self.augment_translate else None
            yield self.dataset.collate(idx, shift)


# --- split resolution and the bundle -------------------------------------------------------------
def _find_split(directory: Path, name: str) -> Path | None:
    for suffix in CSV_SUFFIXES:
        if (directory / f"{name}{suffix}").exists():
            return directory / f"{name}{suffix}"
    return None


def _split_permutation(n: int, fractions: tuple[float, ...]) -> list[np.ndarray]:
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    cuts = np.cumsum([int(round(f * n)) for f in fractions[:-1]])
    return np.split(order, cuts)


def resolve_splits(dataset: str, niggli: bool, cache_dir, num_workers: int,
                   train_split: str | None, eval_split: str | None):
    """{"train"|"val"|"test": CrystalArrays} and a readable mapping of where each came from."""
    path = Path(dataset)
    loose = sorted(path.glob("*.csv*")) if path.is_dir() else []
    if path.is_dir() and loose and not (_find_split(path, "train") or _find_split(path, "val")):
        dataset = ",".join(str(p) for p in loose)  # no split files: split the CSVs it holds
    elif path.is_dir():
        train_name = train_split or ("train" if _find_split(path, "train") else "val")
        test_name = eval_split or "test"
        files = {n: _find_split(path, n) for n in {train_name, test_name, "val"}}
        for n in (train_name, test_name):
            if files[n] is None:
                raise DatasetError(f"{path}: no {n}.csv or {n}.csv.gz (found: "
                                   f"{sorted(p.name for p in loose)}); pass the CSV files"
                                   " themselves, comma-separated, to split them 90/5/5")
        load = lambda n: load_file(files[n], niggli, cache_dir, num_workers)  # noqa: E731
        train = load(train_name)
        if files["val"] is not None and "val" not in (train_name, test_name):
            mapping = {"train": files[train_name].name, "val": files["val"].name,
                       "test": files[test_name].name}
            return {"train": train, "val": load("val"), "test": load(test_name)}, mapping
        tr, va = _split_permutation(len(train), (1 - HOLDOUT_FRACTION, HOLDOUT_FRACTION))
        name = files[train_name].name
        mapping = {"train": f"{name} ({len(tr)} rows, {1 - HOLDOUT_FRACTION:.0%})",
                   "val": f"{name} held out ({len(va)} rows, {HOLDOUT_FRACTION:.0%}, seed "
                          f"{SPLIT_SEED})", "test": files[test_name].name}
        return {"train": train.subset(tr), "val": train.subset(va),
                "test": load(test_name)}, mapping
    files = [Path(p) for p in dataset.split(",") if p]
    missing = [str(p) for p in files if not p.is_file()]
    if missing or not files:
        raise DatasetError(f"dataset {dataset!r}: expected a directory with "
                           f"train/val/test.csv[.gz], or CSV files; missing: {missing}")
    arrays = CrystalArrays.concat([load_file(p, niggli, cache_dir, num_workers) for p in files])
    parts = _split_permutation(len(arrays), (0.9, 0.05, 0.05))
    names = ",".join(p.name for p in files)
    mapping = {k: f"{names} {k} {frac:.0%} (seed {SPLIT_SEED})"
               for k, frac in zip(("train", "val", "test"), (0.9, 0.05, 0.05))}
    return {k: arrays.subset(p) for k, p in zip(("train", "val", "test"), parts)}, mapping


def lattice_stats(arrays: CrystalArrays) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std of (scaled lengths, angles) over the training crystals, std floored at 1e-3
    of the mean magnitude (Perov-5 angles are all 90: their std is 0)."""
    values = np.concatenate([arrays.lengths / arrays.num_atoms[:, None] ** (1 / 3),
                             arrays.angles], axis=1)
    mean, std = values.mean(0), values.std(0)
    std = np.maximum(std, np.maximum(1e-3 * np.abs(mean), 1e-3))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def build_crystal_data(dataset: str, batch_size: int, max_atoms: int = 20, seed: int = 0,
                       num_workers: int = 0, niggli: bool = True, augment_translate: bool = False,
                       cache_dir=None, train_split: str | None = None,
                       eval_split: str | None = None, drop_last: bool = True, rank: int = 0,
                       world_size: int = 1):
    """DataBundle(train, val, test, info) for a CDVAE-format dataset (see the module docstring).

    info["model_overrides"] holds what the crystal model config needs from the data:
    max_atoms (the padded size), num_atoms_hist (training distribution of atom counts, indexed
    by count), lattice_mean and lattice_std. With world_size > 1 the training loader yields
    this rank's shard; val and test are not sharded.
    """
    splits, mapping = resolve_splits(dataset, niggli, cache_dir, max(num_workers, 1),
                                     train_split, eval_split)
    # bad_rows are per source file (a subset keeps its file's list): count them per file.
    skipped = {"bad_cif": {mapping[k].split(" ")[0]: int(len(a.bad_rows)) for k, a in
                           splits.items()}, "too_many_atoms": {}}
    for name, arrays in splits.items():
        keep = np.flatnonzero(arrays.num_atoms <= max_atoms)
        skipped["too_many_atoms"][name] = int(len(arrays) - len(keep))
        splits[name] = arrays.subset(keep)
    if len(splits["train"]) == 0:
        raise ValueError(f"no training crystal has <= {max_atoms} atoms in {dataset}")
    pad_to = int(max(a.num_atoms.max() for a in splits.values() if len(a)))
    hist = np.bincount(splits["train"].num_atoms, minlength=pad_to + 1)[:pad_to + 1]
    mean, std = lattice_stats(splits["train"])
    loaders = {k: CrystalLoader(CrystalDataset(a, pad_to), batch_size, shuffle=k == "train",
                                seed=seed, drop_last=drop_last and k == "train",
                                augment_translate=augment_translate and k == "train",
                                rank=rank if k == "train" else 0,
                                world_size=world_size if k == "train" else 1)
               for k, a in splits.items()}
    info = {"kind": "crystal", "dataset": str(dataset), "dataset_size": len(splits["train"]),
            "max_atoms": pad_to, "splits": mapping, "skipped": skipped,
            "sizes": {k: len(a) for k, a in splits.items()}, "niggli": niggli,
            "augment_translate": augment_translate,
            "model_overrides": {"max_atoms": pad_to,
                                "num_atoms_hist": tuple(float(v) for v in hist / hist.sum()),
                                "lattice_mean": mean, "lattice_std": std}}
    return DataBundle(train=loaders["train"], val=loaders["val"], test=loaders["test"],
                      info=info)
