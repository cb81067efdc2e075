"""The run directory's lifecycle: a new run never replaces an old one by accident, `--overwrite`
removes the old run's files first, and an export that a resumed run would outdate is moved
aside before training changes the checkpoints it was made from.

    <out>/config.json metrics.jsonl test.json   the run's record
    <out>/last/ best/ (+ .tmp / .old mid-swap)  checkpoints (engine.checkpoint)
    <out>/samples/ recon/ plots/                previews and plots
    <out>/export/                               exported graphs + manifest.json (export.*)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from export import manifest

RUN_FILES = ("config.json", "metrics.jsonl", "test.json")
RUN_DIRS = ("last", "best", "last.tmp", "last.old", "best.tmp", "best.old", "samples", "recon",
            "plots", "export", "export.tmp", "export.old")


def existing_run_files(out: Path) -> list[str]:
    """The names of a previous run's files and folders present in `out`."""
    return [name for name in (*RUN_FILES, *RUN_DIRS) if (out / name).exists()]


def check_new_run(out: Path, overwrite: bool) -> None:
    """Refuse to start a new run over a previous one unless --overwrite says so."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; a run is a directory: choose another --out")
    found = existing_run_files(out)
    if found and not overwrite:
        raise ValueError(
            f"--out {out} already holds a run ({', '.join(found[:4])}); continue it with"
            " --resume, or replace it with --overwrite (deletes its checkpoints, metrics and"
            " export), or choose another --out")


def clear_run(out: Path) -> None:
    """Delete a previous run's files (for --overwrite); other files in `out` are kept."""
    for name in RUN_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def retire_export(out: Path) -> Path | None:
    """Move `out/export` to `out/export-step<N>` (N: the step it was exported at) before a
    resumed run rewrites the checkpoints, so that no export sits beside checkpoints it no
    longer matches. Returns the new location, or None when there was no export."""
    export = out / "export"
    manifest.settle(export)  # an export that a crash left mid-swap is moved as well
    if not export.exists():
        return None
    step = _export_step(export)
    target = out / f"export-step{step}" if step is not None else out / "export-stale"
    n = 1
    while target.exists():
        target, n = target.with_name(f"{target.name.split('.')[0]}.{n}"), n + 1
    export.rename(target)
    return target


def _export_step(export: Path) -> int | None:
    """The checkpoint step recorded by the exporters in manifest.json, if readable."""
    try:
        manifest = json.loads((export / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    steps = {a.get("source", {}).get("step") for a in manifest.get("artifacts", {}).values()
             if isinstance(a, dict)}
    steps.discard(None)
    return max(steps) if steps else None
