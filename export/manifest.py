"""manifest.json of an export directory: what each artifact is and how it was checked.

Exporters write their artifacts into a private `staging()` folder beside the export directory,
check them there, and hand them to `commit()`: under a lock beside the directory, a hard-link
copy `<dir>.tmp/` gets the new files and the merged manifest, then replaces `<dir>/` through
`<dir>.old/` (the checkpoints' swap). So a reader sees the old directory or the new one, never
a manifest that disagrees with its files; a failed export (parity, full disk, a kill) leaves the
old one untouched; concurrent exporters into one directory keep each other's files. A crash
between the two renames is read from where it stands (`settled()`: the complete `.tmp/`, else
`.old/`) and put back in place by the next commit. Layout (format 1):

    {
      "format": 1,
      "model": {
        "config": {...},              # the checkpoint's model config; rebuilds the model
        "family": "mlp",
        "latent": {"kind": "gaussian" | "codes", "shape": [20], "dtype": "float32",
                   "num_codes": 0, "dynamic_axes": {}},   # non-batch dynamic axes
        "output_shape": [1, 28, 28],  # decoder output per item
        "conditional": false, "num_classes": 0,
        "latent_diffusion": {         # latent-diffusion VAEs only
          "scaling_factor": 0.18215, "shift_factor": 0.0, "spatial_factor": 8, "prior": false,
          "convention": "diffusion latents = (z - shift_factor) * scaling_factor; ..."}
      },
      "artifacts": {
        "decoder.onnx": {
          "part": "decoder", "format": "onnx" | "aoti" | "tensorrt", "file": "decoder.onnx",
          "sha256": "...", "bytes": 1234, "precision": "fp32", "device": "cpu",
          "inputs":  [{"name": "z", "shape": ["batch", 20], "dtype": "float32",
                       "dynamic_axes": {"0": "batch"}, "example_shape": [2, 20]}],
          "outputs": [{"name": "images", "shape": ["batch", 1, 28, 28], ...}],
          "batch_range": [1, null],    # [min, max]; null = unbounded
          "settings": {...},           # opset, fp16, optimizer, torch version, ...
          "source": {"checkpoint": "...", "step": 1200},
          "parity": {"max_abs": ..., "max_rel": ..., "batches": [1, 7, 256], ...}
        }
      }
    }

`artifact_metadata()` flattens the model section into the string map that AOTInductor embeds
in a .pt2 (read in C++ through AOTIModelPackageLoader::get_metadata()) and that ONNX files
carry as metadata_props.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.checkpoint import (
    atomic_write_json,
    finish_interrupted_swap,
    fsync_path,
    settled_copy,
    sha256,
    swap_into_place,
)

FORMAT = 1
MANIFEST = "manifest.json"
_OLD_LOCK = ".manifest.lock"  # inside the directory, before commits swapped it whole
LABEL_INPUTS = ("y", "labels")  # decoder inputs that carry class labels (conditional models)


class ManifestError(RuntimeError):
    """A manifest that is missing, corrupt or of an unknown format."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_specs(
    names: Sequence[str], tensors: Sequence[Tensor], dynamic_axes: dict[str, dict[int, str]]
) -> list[dict[str, Any]]:
    """One spec per tensor: name, shape with dynamic axes named, dtype, dynamic axes."""
    specs = []
    for name, t in zip(names, tensors):
        axes = dynamic_axes.get(name, {0: "batch"})
        shape = [axes.get(i, int(d)) for i, d in enumerate(t.shape)]
        specs.append({"name": name, "shape": shape, "dtype": dtype_name(t.dtype),
                      "dynamic_axes": {str(k): v for k, v in axes.items()},
                      "example_shape": [int(d) for d in t.shape]})
    return specs


def model_section(config: dict[str, Any], decoder_inputs: list[dict], decoder_outputs: list[dict]
                  ) -> dict[str, Any]:
    """The model description every artifact shares, from the decoder part's specs."""
    latent = decoder_inputs[0]
    is_codes = not latent["dtype"].startswith(("float", "bfloat"))
    names = [s["name"] for s in decoder_inputs[1:]]
    label_inputs = [n for n in names if n in LABEL_INPUTS]
    section = {
        "config": config,
        "family": config.get("family", ""),
        # Concrete per-item shapes (a dynamic non-batch axis, e.g. a crystal's "atoms", at its
        # example size, listed in latent.dynamic_axes): what sampling draws.
        "latent": {"kind": "codes" if is_codes else "gaussian", "name": latent["name"],
                   "shape": latent["example_shape"][1:], "dtype": latent["dtype"],
                   "num_codes": int(config.get("num_codes", 0) or 0) if is_codes else 0,
                   "dynamic_axes": {k: v for k, v in latent["dynamic_axes"].items() if k != "0"}},
        "output_shape": decoder_outputs[0]["example_shape"][1:],
        "conditional": bool(label_inputs),
        "label_input": label_inputs[0] if label_inputs else None,
        "extra_inputs": [n for n in names if n not in LABEL_INPUTS],  # e.g. a crystal's mask
        "num_classes": int(config.get("num_classes", 0) or 0),
    }
    if "scaling_factor" in config:
        section["latent_diffusion"] = latent_diffusion_section(config, section)
    return section


def latent_diffusion_section(config: dict[str, Any], section: dict[str, Any]) -> dict[str, Any]:
    """What a latent-diffusion VAE's artifacts add: the latent normalization, the ratio of
    image to latent sides (height and width are dynamic; latent.shape and output_shape hold
    the example's) and the absence of a prior to sample from."""
    return {"scaling_factor": float(config["scaling_factor"]),
            "shift_factor": float(config.get("shift_factor") or 0.0),
            "convention": "diffusion latents = (z - shift_factor) * scaling_factor; the decoder"
                          " takes z = latents / scaling_factor + shift_factor",
            "spatial_factor": section["output_shape"][-1] // section["latent"]["shape"][-1],
            "prior": False}


def artifact_entry(path: Path, part: str, fmt: str, *, inputs: list[dict], outputs: list[dict],
                   precision: str, device: str, settings: dict[str, Any],
                   parity: dict[str, Any] | None, source: dict[str, Any] | None = None,
                   batch_range: tuple[int, int | None] = (1, None)) -> dict[str, Any]:
    path = Path(path)
    return {"part": part, "format": fmt, "file": path.name, "sha256": sha256(path),
            "bytes": path.stat().st_size, "precision": precision, "device": device,
            "inputs": inputs, "outputs": outputs, "batch_range": list(batch_range),
            "settings": settings, "source": source or {}, "parity": parity}


# --- reading ---------------------------------------------------------------------------------
def read(export_dir: str | os.PathLike, *, missing_ok: bool = True) -> dict[str, Any]:
    """The manifest of `export_dir`, or of the newest complete copy a crash mid-swap left."""
    export_dir = Path(export_dir)
    path = (settled(export_dir) or export_dir) / MANIFEST
    if not path.exists():
        if missing_ok:
            return {"format": FORMAT, "model": None, "artifacts": {}}
        raise ManifestError(f"no {MANIFEST} in {export_dir}: export there first"
                            " (python -m export.onnx CKPT --out DIR)")
    return _parse(path)


def _parse(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); re-run the export to rewrite it"
                            ) from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path}: expected manifest format {FORMAT}, got"
                            f" {data.get('format') if isinstance(data, dict) else type(data)}")
    data.setdefault("artifacts", {})
    return data


def complete(export_dir: Path) -> bool:
    """A fully written export directory: manifest.json (written last) parses and every file it
    lists matches its recorded size and SHA-256."""
    try:
        artifacts = _parse(export_dir / MANIFEST)["artifacts"]
        return all(isinstance(e, dict) and _matches(export_dir / name, e)
                   for name, e in artifacts.items())
    except (OSError, ManifestError):
        return False


def _matches(path: Path, entry: dict[str, Any]) -> bool:
    return path.stat().st_size == entry.get("bytes") and sha256(path) == entry.get("sha256")


def settled(export_dir: str | os.PathLike) -> Path | None:
    """Where the export directory stands: itself, or, when a crash between its two renames
    left none, the complete new `<dir>.tmp/`, else the previous `<dir>.old/`; None if none."""
    export_dir = Path(export_dir)
    return settled_copy(export_dir, *_swap_names(export_dir), complete, MANIFEST)


# --- committing: stage, then swap the whole directory -----------------------------------------
def _real(export_dir: str | os.PathLike) -> Path:
    """The directory a commit replaces: absolute (`--out .` has no name to extend), links
    resolved (an `export` symlink keeps pointing at the folder its commits replace)."""
    return Path(os.path.realpath(export_dir))


def _swap_names(export_dir: Path) -> tuple[Path, Path]:
    """(`<dir>.tmp`, `<dir>.old`) beside the real directory."""
    d = _real(export_dir)
    return d.with_name(d.name + ".tmp"), d.with_name(d.name + ".old")


@contextlib.contextmanager
def _locked(export_dir: Path) -> Iterator[None]:
    """flock on `<parent>/.<name>.lock`: beside the directory, which each commit replaces."""
    d = _real(export_dir)
    d.parent.mkdir(parents=True, exist_ok=True)
    with open(d.with_name(f".{d.name}.lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def check_replaceable(export_dir: Path) -> None:
    """An export replaces its directory as a whole (two renames): refuse a mount point and a
    folder of other files (`--out .`), which must never be moved aside."""
    fix = f"export into a new or empty folder, e.g. --out {Path(export_dir) / 'export'}"
    if os.path.ismount(export_dir):
        raise ManifestError(f"--out {export_dir} is a mount point, which an export cannot"
                            f" replace by renaming; {fix}")
    if export_dir.exists() and not export_dir.is_dir():
        raise ManifestError(f"--out {export_dir} is a file, not an export directory; {fix}")
    if export_dir.is_dir() and settled(export_dir) is None and \
            any(p.name != _OLD_LOCK for p in export_dir.iterdir()):
        raise ManifestError(f"--out {export_dir} holds files but no {MANIFEST}: it is not an"
                            f" export directory, and an export replaces its folder whole; {fix}")


@contextlib.contextmanager
def staging(export_dir: str | os.PathLike, check: bool = True) -> Iterator[Path]:
    """A private folder beside `export_dir` (same filesystem: its files move in by rename) where
    an exporter writes and checks its artifacts before `commit`; removed afterwards, whatever
    happened. Staging folders of processes that died (SIGKILL) are removed first. `check`: refuse
    up front a directory that `commit` would refuse."""
    d = _real(export_dir)
    if check:
        check_replaceable(d)
    d.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_stages(d)
    stage = Path(tempfile.mkdtemp(prefix=f".{d.name}.stage-{os.getpid()}-", dir=d.parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _remove_dead_stages(export_dir: Path) -> None:
    prefix = f".{export_dir.name}.stage-"
    for p in export_dir.parent.iterdir():
        pid = p.name[len(prefix):].split("-", 1)[0] if p.name.startswith(prefix) else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def settle(export_dir: str | os.PathLike) -> None:
    """Put back in place the newest complete copy that a crash mid-swap left and remove the
    other half (no-op otherwise), e.g. before moving or deleting the export directory."""
    export_dir = _real(export_dir)
    tmp, old = _swap_names(export_dir)
    if tmp.exists() or old.exists():  # else nothing to settle, and no lock file to leave
        with _locked(export_dir):
            finish_interrupted_swap(export_dir, tmp, old, complete, MANIFEST)
            if (export_dir / MANIFEST).exists():
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.rmtree(old, ignore_errors=True)


def commit(export_dir: str | os.PathLike, model: dict[str, Any] | None,
           files: dict[str, tuple[Path, dict[str, Any] | None]]) -> dict[str, Any]:
    """Move staged files into `export_dir` and list them, all at once; returns the manifest.

    files: name -> (staged path, manifest entry, or None for a file listed nowhere, e.g. a
    TensorRT sidecar). Under the lock: settle a swap a crash interrupted, build `<dir>.tmp/` as
    hard links of the current files (no data copied, and the renames below never touch the
    current directory's inodes), rename the staged files over them, write the merged manifest,
    then swap `<dir>.tmp/` into place through `<dir>.old/` (engine.checkpoint.swap_into_place).
    Any failure before the swap leaves `export_dir` as it was. When `model` describes another
    model config than the manifest's, the old entries are stale: dropped, with a warning.
    """
    export_dir = _real(export_dir)
    with _locked(export_dir):
        tmp, old = _swap_names(export_dir)
        finish_interrupted_swap(export_dir, tmp, old, complete, MANIFEST)
        check_replaceable(export_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        data = _merged(read(export_dir), export_dir, model,
                       {n: e for n, (_, e) in files.items() if e is not None})
        try:
            _link_tree(export_dir, tmp)
            for name, (staged, _) in files.items():
                fsync_path(staged)
                os.replace(staged, tmp / name)
            atomic_write_json(tmp / MANIFEST, data)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        swap_into_place(tmp, export_dir, old)
        return data


def _merged(data: dict[str, Any], export_dir: Path, model: dict[str, Any] | None,
            entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if model is not None:
        old = data.get("model")
        if old is not None and old.get("config") != model.get("config"):
            stale = sorted(set(data["artifacts"]) - set(entries))
            if stale:
                print(f"warning: {export_dir / MANIFEST} described another model config;"
                      f" dropping its entries {stale}", file=sys.stderr)
            data["artifacts"] = {}
        data["model"] = model
    data["artifacts"].update(entries)
    return data


def _link_tree(src: Path, dst: Path) -> None:
    """`dst`: src's files and folders as hard links (copies where links fail), without its
    manifest (rewritten) and a lock file of the format before (`.manifest.lock`)."""
    if not src.is_dir():
        dst.mkdir(parents=True)
        return
    skip = lambda folder, names: [n for n in names if Path(folder) == src
                                  and n in (MANIFEST, _OLD_LOCK)]
    shutil.copytree(src, dst, symlinks=True, ignore=skip, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)



def find(manifest: dict[str, Any], part: str = "decoder",
         formats: Sequence[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(file, entry) of `part`, in the order of `formats` when given."""
    items = [(f, e) for f, e in manifest.get("artifacts", {}).items() if e.get("part") == part]
    if formats is None:
        return items
    return sorted([it for it in items if it[1].get("format") in formats],
                  key=lambda it: list(formats).index(it[1]["format"]))


# --- metadata embedded in the artifacts -----------------------------------------------------
def artifact_metadata(model: dict[str, Any], part: str, inputs: list[dict], outputs: list[dict],
                  device: str, precision: str = "fp32") -> dict[str, str]:
    """String map embedded in a .pt2 (`aot_inductor.metadata`) and in ONNX metadata_props.

    Keys (all values are strings):

    vae_engine_format "1"; part "decoder"; family; device "cpu"|"cuda"; precision "fp32";
    latent_kind "gaussian"|"codes"; latent_shape "20" or "7,7"; latent_dtype "float32"|"int64";
    output_shape "1,28,28"; input_names "z" or "z,y"; output_names "images";
    conditional "0"|"1"; num_classes "0"|"10"; num_codes "0"|"64";
    min_batch "1"; max_batch "0" (0 = unbounded); model_config (JSON);
    latent-diffusion VAEs also: spatial_factor "8" (latent and image height and width are
    dynamic; image side = spatial_factor * latent side), prior "0", scaling_factor, shift_factor.
    """
    join = lambda xs: ",".join(str(x) for x in xs)
    latent = model["latent"]
    return {
        "vae_engine_format": str(FORMAT), "part": part, "family": model["family"],
        "device": device, "precision": precision,
        "latent_kind": latent["kind"], "latent_shape": join(latent["shape"]),
        "latent_dtype": latent["dtype"], "output_shape": join(model["output_shape"]),
        "input_names": join(s["name"] for s in inputs),
        "output_names": join(s["name"] for s in outputs),
        "conditional": "1" if model["conditional"] else "0",
        "num_classes": str(model["num_classes"]), "num_codes": str(latent["num_codes"]),
        "min_batch": "1", "max_batch": "0",
        "model_config": json.dumps(model["config"], sort_keys=True),
        **_latent_diffusion_metadata(model),
    }


def _latent_diffusion_metadata(model: dict[str, Any]) -> dict[str, str]:
    """spatial_factor "8", prior "0", scaling_factor, shift_factor: latent-diffusion VAEs only
    (the other families' artifacts carry exactly the keys above)."""
    ld = model.get("latent_diffusion")
    if not ld:
        return {}
    return {"spatial_factor": str(ld["spatial_factor"]), "prior": "0",
            "scaling_factor": repr(ld["scaling_factor"]), "shift_factor": repr(ld["shift_factor"])}
