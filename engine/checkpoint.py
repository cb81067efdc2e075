"""Checkpoints: safetensors weights + JSON config + optimizer/scheduler/step/RNG state.

A checkpoint is a directory, self-contained (its config alone rebuilds the model):

    <ckpt>/config.json         {"model": {...family config...}, "train": {...}, "versions": {...}}
    <ckpt>/model.safetensors   model weights (and buffers)
    <ckpt>/ema.safetensors     EMA weights, when training used --ema
    <ckpt>/state.safetensors   optimizer tensors, scheduler/RNG states
    <ckpt>/state.json          step, epoch, metrics, the optimizer's non-tensor state, and the
                               SHA-256 of every file above (checked on load)

Writes are atomic at the directory level: files go to `<ckpt>.tmp/` (each fsynced), the old
directory is renamed to `<ckpt>.old/`, the new one renamed into place, then `.old` removed. A
crash at any point leaves `<ckpt>/`, a complete `<ckpt>.tmp/` or `<ckpt>.old/`: `resolve()`
reads the newest complete one, and the next `save()` first puts it back in place. Loading
never unpickles: safetensors and JSON only, and every file is checked against the SHA-256 that
state.json records (a state.json without them is refused).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from engine.models.latent_diffusion.pretrained import PICKLE_SUFFIXES
from engine.models.registry import config_to_dict, model_from_config

FORMAT_VERSION = 1
WEIGHT_FILES = ("model.safetensors", "ema.safetensors", "state.safetensors")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, truncated or of the wrong model."""


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))


# --- atomic file helpers ------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    """fsync a folder (its entries: a rename is durable) or a file (its data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_path  # the name the folder callers use


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a hidden temp file beside `path` (same suffix, for writers that pick
    the format from it); it is fsynced and renamed over `path`, then the folder is fsynced:
    readers see the old file or the new one, never half. When anything fails the temp file is
    removed, `path` is untouched, and an OSError names `path` (a failed write() names none)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # on a read-only disk even this unlink fails
            tmp.unlink(missing_ok=True)
        raise_named(e, path, tmp)
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """temp file in the same directory, fsync, rename: readers see old or new, never half."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def raise_named(e: BaseException, path: Path, *stand_ins: Path) -> NoReturn:
    """Re-raise an I/O failure as an OSError that names `path`: write() errors name no file,
    a temp file (`stand_ins`) means nothing to the user, and safetensors wraps the OS error in
    text ("... (os error 28)"). Anything else is re-raised unchanged."""
    if isinstance(e, SafetensorError) and (m := re.search(r"os error (\d+)", str(e))):
        raise OSError(int(m[1]), os.strerror(int(m[1])), str(path)) from e
    temps = {str(p) for p in stand_ins}
    if isinstance(e, OSError) and e.errno is not None and (e.filename is None or
                                                           e.filename in temps):
        raise OSError(e.errno, e.strerror, str(path)) from e
    if isinstance(e, OSError) and e.errno is not None and e.filename2 in temps:  # a copy
        raise OSError(e.errno, e.strerror, e.filename, None, str(path)) from e
    raise e


# errno -> (what went wrong, how to fix it), for describe_os_error
_WRITE_CAUSES = {
    errno.ENOSPC: ("no space left on the device", "free some space there or write to"
                   " another disk (choose another output path)"),
    errno.EDQUOT: ("disk quota exceeded", "free some space there or choose another output"
                   " path"),
    errno.EROFS: ("the file system is read-only", "choose an output path on a writable disk"
                  " (or remount it read-write)"),
}


def describe_os_error(e: OSError) -> str:
    """One line for a failed file operation: the path, the cause and the fix, e.g.
    `cannot write runs/mlp/last: no space left on the device; free some space there ...`."""
    where = e.filename2 if e.filename2 is not None else e.filename
    where = "the output" if where is None else os.fsdecode(where)
    if e.errno in _WRITE_CAUSES:
        cause, fix = _WRITE_CAUSES[e.errno]
        return f"cannot write {where}: {cause}; {fix}"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"cannot access {where}: permission denied; fix its permissions or choose" \
            " another path"
    return f"{where}: {e.strerror or e}"


def describe_out_of_memory(e: BaseException, fix: str) -> str:
    """One line for torch's OutOfMemoryError (several sentences and a tuning hint): what was
    asked for and what was free, then `fix`. Frees the cached blocks, so smaller work can run."""
    msg = " ".join(str(e).split())
    asked = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]?i?B)", msg)
    free = re.search(r"of which ([\d.]+ [KMGT]?i?B) is free", msg)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    said = ", ".join(part for part in (asked and f"asked for {asked[1]}",
                                       free and f"{free[1]} free") if part)
    return f"the device ran out of memory{f' ({said})' if said else ''}: {fix}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- optimizer state <-> (tensors, json) ----------------------------------------------------
def split_state(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested state dict by {"__tensor__": key}, collecting them."""
    if isinstance(state, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = state.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(state, dict):
        return {str(k): split_state(v, f"{prefix}.{k}", tensors) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [split_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(state)]
    return state


def join_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: join_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_state(v, tensors) for v in obj]
    return obj


def optimizer_state_from_json(obj: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict:
    """JSON turns the optimizer's int parameter ids into strings; turn them back."""
    state = join_state(obj, tensors)
    state["state"] = {int(k): v for k, v in state["state"].items()}
    return state


# --- save -----------------------------------------------------------------------------------
def _state_dict_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save(
    path: Path,
    model: nn.Module,
    *,
    train_config: dict[str, Any] | None = None,
    ema: nn.Module | None = None,
    extra_state: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint directory atomically. `extra_state` must be JSON-serialisable."""
    path = Path(path)
    tmp, old = _swap_names(path)
    _finish_interrupted_swap(path, tmp, old)
    shutil.rmtree(tmp, ignore_errors=True)
    config = {"format": FORMAT_VERSION, "model": config_to_dict(model.config),
              "train": train_config or {}, "versions": {"torch": torch.__version__}}
    try:
        tmp.mkdir(parents=True)
        _write_safetensors(tmp / "model.safetensors", _state_dict_cpu(model))
        if ema is not None:
            _write_safetensors(tmp / "ema.safetensors", _state_dict_cpu(ema))
        if extra_tensors:
            _write_safetensors(tmp / "state.safetensors", extra_tensors)
        atomic_write_json(tmp / "config.json", config)
        hashes = {name: sha256(tmp / name) for name in (*WEIGHT_FILES, "config.json")
                  if (tmp / name).exists()}
        atomic_write_json(tmp / "state.json", {**(extra_state or {}), "sha256": hashes})
    except BaseException as e:  # a full or read-only disk: the old checkpoint stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise_named(e, path, tmp, *(tmp / n for n in (*WEIGHT_FILES, "config.json", "state.json")))
    swap_into_place(tmp, path, old)
    return path


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path))
    fsync_path(path)


def _swap_names(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")


def _finish_interrupted_swap(path: Path, tmp: Path, old: Path) -> None:
    finish_interrupted_swap(path, tmp, old, _complete, "state.json")


def finish_interrupted_swap(path: Path, tmp: Path, old: Path, complete: Callable[[Path], bool],
                            marker: str) -> None:
    """A crash between `path -> old` and `tmp -> path` leaves no `path`: put the newest complete
    copy in place (the `tmp` that `complete` accepts, else `old`), so that the next write never
    deletes the only good copy. `marker` is the file a directory of this kind always holds
    (state.json, manifest.json, ...)."""
    if (path / marker).exists():
        return
    if complete(tmp):
        os.replace(tmp, path)
    elif (old / marker).exists():
        os.replace(old, path)


def settled_copy(path: Path, tmp: Path, old: Path, complete: Callable[[Path], bool],
                 marker: str) -> Path | None:
    """Where a reader finds the directory `path` now: `path` itself, or, if a crash left it
    mid-swap, the newest complete copy (`tmp` if `complete`, else `old`); None if none."""
    if (path / marker).exists():
        return path
    if complete(tmp):
        return tmp
    return old if (old / marker).exists() else None


def swap_into_place(tmp: Path, path: Path, old: Path) -> None:
    """`path -> old`, `tmp -> path`, fsync, remove `old`: readers see the old or the new
    directory, never a mix; a crash in between is settled by `finish_interrupted_swap`."""
    fsync_dir(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


# --- load -----------------------------------------------------------------------------------
def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a checkpoint dir, a run dir (-> last/, else best/) or a file
    in one. A swap that a crash interrupted (`<ckpt>/` gone) is read from where it stands: the
    complete new `<ckpt>.tmp/`, else the previous `<ckpt>.old/`."""
    p = Path(path)
    if p.is_file() and p.name in (*WEIGHT_FILES, "config.json", "state.json"):
        p = p.parent
    elif p.is_file():
        pickle = p.suffix.lower() in PICKLE_SUFFIXES
        raise CheckpointError(
            f"{p} is a file, not a checkpoint: expected a run directory (with last/ or best/) or a"
            " checkpoint directory" + ("; it is a pickle, which this engine never loads (it runs"
                                       " code): save its state_dict with safetensors" if pickle
                                       else ""))
    for base in (p, p / "last", p / "best"):
        found = _settled(base)
        if found is not None:
            return found
    raise CheckpointError(
        f"no checkpoint at {path}: expected a run directory (with last/ or best/) or a"
        " checkpoint directory holding config.json, model.safetensors and state.json"
    )


def _settled(path: Path) -> Path | None:
    """`path` if it is a checkpoint; if a crash left it mid-swap, the newest complete copy."""
    return settled_copy(path, *_swap_names(path), _complete, "state.json")


def _complete(path: Path) -> bool:
    """A fully written checkpoint directory: state.json (written last) and every file it hashes."""
    try:
        _verify(path, _read_json(path / "state.json"))
    except CheckpointError:
        return False
    return True


def _verify(path: Path, state: dict[str, Any]) -> None:
    hashes = state.get("sha256")
    if not isinstance(hashes, dict) or "model.safetensors" not in hashes:
        raise CheckpointError(
            f"checkpoint {path} has no SHA-256 entries in state.json, so its files cannot be"
            " verified: it was not written by vae-engine or state.json was edited; re-save it"
            " with engine.checkpoint.save, or use another checkpoint"
        )
    for name in (*WEIGHT_FILES, "config.json"):
        if (path / name).exists() and name not in hashes:
            raise CheckpointError(f"checkpoint {path}: {name} has no recorded SHA-256 in"
                                  " state.json (added after saving?); it cannot be verified")
    for name, digest in hashes.items():
        if not (path / name).exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if sha256(path / name) != digest:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {name} does not match its recorded SHA-256"
                " (truncated or modified); use another checkpoint, e.g. best/ or last/"
            )


def read(path: str | os.PathLike, verify: bool = True) -> Checkpoint:
    p = resolve(path)
    state = _read_json(p / "state.json")
    if verify:
        _verify(p, state)
    return Checkpoint(p, _read_json(p / "config.json"), state)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file missing: {path}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {path} is not valid JSON ({e})") from e


def read_tensors(ckpt: Checkpoint, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(ckpt.path / name))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {ckpt.path / name}: {e}") from e


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Strict load with a one-line error that names the mismatch instead of torch's dump."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{where} does not fit this {type(model).__name__}: missing {missing[:3]},"
            f" unexpected {unexpected[:3]}, shape mismatch {wrong[:3]}; was it written for"
            " another model or config?"
        )
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(
            f"{where} holds NaN or inf in {len(bad)} tensor(s) (first: {bad[0]}): training"
            " diverged before this was saved, or it was written by another tool; use an earlier"
            " checkpoint (e.g. the run's best/)"
        )
    model.load_state_dict(tensors)


def load_model(
    path: str | os.PathLike, *, ema: bool = False, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Checkpoint]:
    """Rebuild a model from a checkpoint (or run) directory alone; eval mode, on `device`."""
    ckpt = read(path)
    try:
        model = model_from_config(ckpt.config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path}/config.json has no valid model config: {e}") from e
    name = "ema.safetensors" if ema and (ckpt.path / "ema.safetensors").exists() else \
        "model.safetensors"
    load_weights(model, read_tensors(ckpt, name), ckpt.path / name)
    return model.to(device).eval(), ckpt
