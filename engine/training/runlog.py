"""The run directory's logs: metrics.jsonl rows (append-only, fsynced, torn-line tolerant) and
the JSON-safe forms of configs and states."""

from __future__ import annotations

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
    with open(path, "a") as f:
        f.write(json.dumps(json_safe(row)) + "\n")
        f.flush()
        os.fsync(f.fileno())


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
