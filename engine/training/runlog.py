"""The run directory's logs: metrics.jsonl rows (append-only, fsynced, torn-line tolerant) and
the JSON-safe forms of configs and states."""

from __future__ import annotations

import contextlib
import json
import math
import os
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import engine


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """One line, fsynced. A write that fails part-way (a full disk) is cut back off, so the
    file never ends in a torn line; the OSError names `path`."""
    line = (json.dumps(json_safe(row)) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            _write_all(fd, line)
            os.fsync(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)  # the bytes that did fit go again
            raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write only part (the rest raises, e.g. ENOSPC, on the next call)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a torn last line (a crash mid-write) is ignored."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def train_config(args: Namespace) -> dict[str, Any]:
    return json_safe({k: v for k, v in vars(args).items()})


def versions() -> dict[str, str]:
    out = {"vae_engine": engine.__version__, "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out
