"""Shared benchmark fixtures: synchronizing timers and the metadata every figure carries.

Run from the repository root:  pytest --benchmark-only  (add -k to pick subjects).
Groups are named <subject>-<mode>-<dtype>; providers are parametrized (eager, compile, ...).
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
REPO = Path(__file__).resolve().parents[1]


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "onnxruntime", "torchvision"):
        with contextlib.suppress(ImportError):
            out[name] = __import__(name).__version__
    return out


def synchronized(fn: Callable, device: torch.device | str) -> Callable:
    """Wrap fn so the timer sees finished device work: CUDA launches are asynchronous."""
    if torch.device(device).type != "cuda":
        return fn

    def run(*args, **kwargs):
        result = fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        return result

    return run


@pytest.fixture
def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def record(benchmark, bench_device):
    """record(**figures): put derived figures plus device/versions/commit into extra_info."""
    benchmark.extra_info.update(device=device_name(bench_device), commit=git_commit(),
                                **versions())

    def add(**figures):
        benchmark.extra_info.update(figures)

    return add
