"""Shared checks of the fault suite: after every case, (1) a failure is one line on stderr, no
traceback, and a non-zero exit; (2) every file that existed before is unchanged; (3) no
half-written artifact (`*.tmp*`, `.*.tmp*`) is left visible."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = os.environ.get("VAE_DATA_DIR", str(REPO.parent / "shared" / "datasets"))
needs_mnist = pytest.mark.skipif(not Path(DATA_DIR, "MNIST", "raw").is_dir(),
                                 reason=f"MNIST not found under {DATA_DIR}; set VAE_DATA_DIR")


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> SHA-256 of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_clean_failure(code: int, err: str) -> None:
    assert code != 0, "expected a non-zero exit"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err


def assert_intact(root: Path, before: dict[str, str]) -> None:
    after = snapshot(root)
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    assert not changed, f"pre-existing files changed or lost: {changed}"
    half = sorted(k for k in after if ".tmp" in Path(k).name)
    assert not half, f"half-written files left visible: {half}"
