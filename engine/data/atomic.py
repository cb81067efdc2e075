"""All-or-nothing files for the data layer, which sits below `engine.checkpoint` (whose
`atomic_write` imports the models, and they import this package)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def replace_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """`write(f)` fills a temp file beside `path`, unique to this call (processes started in
    parallel on one data dir each write their own); it is fsynced and renamed over `path`.
    Readers see no file or the whole file; on any failure the temp file is removed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
