"""Image datasets (MNIST, Fashion-MNIST through torchvision) and the in-memory batch loader.

Data location, in order: `--data-dir`, the `VAE_DATA_DIR` environment variable, then
`~/.cache/vae-engine/data` (where torchvision downloads when online). A directory laid out as
torchvision expects (`<dir>/MNIST/raw/*.gz`) works offline; a read-only one (a shared dataset
mount) is mirrored into the cache first, because torchvision extracts the .gz files in place.

The whole dataset (60k x 28 x 28 uint8 = 47 MB) lives in one tensor on the training device, so
a batch is one index_select: no per-item Python, no worker processes needed.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.data.atomic import replace_atomically

VAL_SIZE = 5000
SPLIT_SEED = 20240601  # fixed: the validation split never depends on --seed
TEST_BINARIZE_SEED = 1234  # fixed binarization of the test set, so test NLLs are comparable


class DatasetError(RuntimeError):
    """A dataset that cannot be found, downloaded or read."""


@dataclass
class DataBundle:
    """Loaders for the three splits plus what the model config needs (`info`)."""

    train: Any
    val: Any
    test: Any
    info: dict[str, Any] = field(default_factory=dict)


def _torchvision_class(name: str):
    import torchvision.datasets as tvd

    return {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]


IMAGE_DATASETS = ("mnist", "fashion-mnist")


def default_data_dir(data_dir: str | os.PathLike | None) -> Path:
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("VAE_DATA_DIR"):
        return Path(os.environ["VAE_DATA_DIR"]).expanduser()
    return cache_dir() / "data"


def cache_dir() -> Path:
    return Path(os.environ.get("VAE_CACHE_DIR", "~/.cache/vae-engine")).expanduser()


def _writable_root(root: Path, folder: str) -> Path:
    """`root` if torchvision can extract there, else a cache mirror of its raw .gz files."""
    raw = root / folder / "raw"
    if not raw.is_dir():
        return root
    needs_extract = any(not gz.with_suffix("").exists() for gz in raw.glob("*.gz"))
    read_only = not raw.stat().st_mode & stat.S_IWUSR  # mode bits: root ignores os.access
    if not (needs_extract and read_only):
        return root
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    mirror = cache_dir() / "data-mirror" / key
    (mirror / folder / "raw").mkdir(parents=True, exist_ok=True)
    for src in raw.iterdir():
        dst = mirror / folder / "raw" / src.name
        if not dst.exists():  # a temp file per process: parallel runs may mirror at once
            with open(src, "rb") as f:
                replace_atomically(dst, lambda out, f=f: shutil.copyfileobj(f, out, 1 << 20))
    return mirror


def _extract(root: Path, folder: str) -> None:
    """Decompress each `root/folder/raw/*.gz` whose file is missing, through a temp file and a
    rename. torchvision extracts in place, so runs started in parallel on a fresh data dir read
    each other's half-written files (seen: 2 of 8 pytest workers failed on MNIST)."""
    for gz in sorted((root / folder / "raw").glob("*.gz")):
        if gz.with_suffix("").exists():
            continue
        def unzip(out: IO[bytes], gz: Path = gz) -> None:
            with gzip.open(gz, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
        try:
            replace_atomically(gz.with_suffix(""), unzip)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DatasetError(f"{gz} is not a complete gzip file ({type(e).__name__}: {e});"
                               " replace it with the original download") from e


def load_images(name: str, data_dir: str | os.PathLike | None,
                train: bool) -> tuple[Tensor, Tensor]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)) of one torchvision split."""
    if name not in IMAGE_DATASETS:
        raise DatasetError(
            f"unknown dataset {name!r}; valid datasets: {', '.join(IMAGE_DATASETS)}"
            " (or a path to crystal CSV files with --model crystal)"
        )
    cls = _torchvision_class(name)
    root = default_data_dir(data_dir)
    if (data_dir or os.environ.get("VAE_DATA_DIR")) and not root.is_dir():
        source = "--data-dir" if data_dir else "VAE_DATA_DIR"
        raise DatasetError(
            f"{source} {root} does not exist (it is not created); point it at a directory"
            f" holding {cls.__name__}/raw/*-ubyte.gz, or leave it unset to use the cache")
    where = _writable_root(root, cls.__name__)  # OSErrors here name their path: not caught
    _extract(where, cls.__name__)
    try:
        ds = cls(str(where), train=train, download=True)
    except Exception as e:  # URLError, RuntimeError("Error downloading ...") when offline
        raise DatasetError(
            f"{name} is not under {root} and could not be downloaded ({type(e).__name__}:"
            f" {str(e).splitlines()[0] if str(e) else ''}); offline, pass --data-dir or set"
            f" VAE_DATA_DIR to a directory holding {cls.__name__}/raw/*-ubyte.gz"
        ) from e
    return ds.data.unsqueeze(1).contiguous(), ds.targets.long()


def split_train_val(n: int, val_size: int = VAL_SIZE) -> tuple[Tensor, Tensor]:
    """Deterministic (train_idx, val_idx) over n training images."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[val_size:], perm[:val_size]


class TensorLoader:
    """Batches from in-memory uint8 images: shuffling, padding, binarization, DDP sharding.

    images (N, C, H, W) uint8, labels (N,) int64. Yields (x float (B, C, S, S) in [0, 1], y).
    binarize: "none", "dynamic" (a fresh Bernoulli draw per batch) or "static" (fixed draw).
    Shuffling uses a generator seeded by (seed, epoch): the order is a pure function of the
    epoch, so a resumed run replays the same batches (`start_batch` skips the finished ones).
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, *, shuffle: bool,
                 drop_last: bool, pad_to: int | None = None, binarize: str = "none",
                 seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.pad = 0 if pad_to is None else (pad_to - images.shape[-1]) // 2
        self.binarize, self.seed = binarize, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0
        if binarize == "static":
            gen = torch.Generator().manual_seed(TEST_BINARIZE_SEED)
            self.images = (torch.bernoulli(images.float() / 255, generator=gen) * 255).to(
                torch.uint8).to(self.device)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _indices(self) -> Tensor:
        n = self.images.shape[0]
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        per_rank = len(range(self.rank, self.images.shape[0], self.world_size))
        full, rest = divmod(per_rank, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self._indices().to(self.device)
        for b in range(self.start_batch, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self._prepare(self.images[idx]), self.labels[idx]

    def _prepare(self, raw: Tensor) -> Tensor:
        x = raw.float().div_(255)  # (B, C, 28, 28) in [0, 1]
        if self.binarize == "dynamic":
            x = torch.bernoulli(x)
        if self.pad:
            x = F.pad(x, (self.pad,) * 4)
        return x


def _without_classes(labels: Tensor, train_idx: Tensor, val_idx: Tensor,
                     excluded: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The train/val indices whose labels are not in `excluded` (checked against the labels)."""
    classes = sorted(set(labels.tolist()))
    unknown = sorted(set(excluded) - set(classes))
    if unknown:
        raise DatasetError(f"--exclude-class {unknown}: not a class of this dataset (classes"
                           f" {classes[0]}..{classes[-1]})")
    if set(classes) <= set(excluded):
        raise DatasetError(f"--exclude-class removes every class ({len(classes)}): nothing is"
                           " left to train on; exclude fewer classes")
    keep = ~torch.isin(labels, torch.tensor(excluded))
    return train_idx[keep[train_idx]], val_idx[keep[val_idx]]


def build_image_data(name: str, *, data_dir: str | None, batch_size: int, eval_batch_size: int,
                     pad_to_32: bool, binarize: bool, seed: int, rank: int = 0,
                     world_size: int = 1, device: torch.device | str = "cpu",
                     exclude_classes: tuple[int, ...] = ()) -> DataBundle:
    """MNIST / Fashion-MNIST loaders: train (shuffled, sharded), val (5k held out), test.

    exclude_classes removes those labels from train and val (for anomaly detection); the test
    split keeps every class.
    """
    images, labels = load_images(name, data_dir, train=True)
    test_images, test_labels = load_images(name, data_dir, train=False)
    train_idx, val_idx = split_train_val(images.shape[0])
    if exclude_classes:
        train_idx, val_idx = _without_classes(labels, train_idx, val_idx, exclude_classes)
    common = dict(pad_to=32 if pad_to_32 else None, device=device)
    train = TensorLoader(images[train_idx], labels[train_idx], batch_size, shuffle=True,
                         drop_last=True, binarize="dynamic" if binarize else "none", seed=seed,
                         rank=rank, world_size=world_size, **common)
    evaluation = dict(shuffle=False, drop_last=False, binarize="static" if binarize else "none")
    val = TensorLoader(images[val_idx], labels[val_idx], eval_batch_size, **evaluation, **common)
    test = TensorLoader(test_images, test_labels, eval_batch_size, **evaluation, **common)
    info = {"in_channels": 1, "image_size": 32 if pad_to_32 else 28, "num_classes": 10,
            "dataset_size": int(train_idx.numel()), "dataset": name}
    return DataBundle(train, val, test, info)
