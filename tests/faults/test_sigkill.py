"""SIGKILL at random moments: `python -m engine.train` and `python -m export.onnx` are killed
several times at fresh random times, and after every kill what the run or export directory
exposes is whole: checkpoints verify, metrics.jsonl holds every row its checkpoint recorded,
`--resume` finishes with one row per epoch, and an export directory loads a verified artifact
(the old one or the new one). Each assertion message carries the seed and the kill times.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt
from engine.models import build_model
from engine.runtime import Sampler
from export import manifest
from export import onnx as onnx_export

from .conftest import DATA_DIR, REPO, needs_mnist

pytestmark = pytest.mark.slow
SEED = int(os.environ.get("VAE_SIGKILL_SEED", int.from_bytes(os.urandom(4), "little")))
# ~85 steps per epoch (one class of MNIST), a checkpoint every 15 steps and at each epoch end.
TRAIN = ("--model", "mlp", "--hidden-dims", "16", "--latent-dim", "4", "--batch-size", "64",
         *(a for c in range(9) for a in ("--exclude-class", str(c))), "--epochs", "2",
         "--ckpt-every", "15", "--eval-batch-size", "2000", "--kernels", "torch",
         "--device", "cpu", "--no-progress")
QUICK = ("--parts", "decoder", "--parity-batches", "1,3")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "ORT_DISABLE_TELEMETRY": "1",
       "VAE_DATA_DIR": DATA_DIR}


def launch(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_after(proc: subprocess.Popen, seconds: float, ready=lambda: True) -> str:
    """SIGKILL `seconds` after `ready()` holds (polled); 'killed', or 'exited N' if it ended."""
    while not ready() and proc.poll() is None:
        time.sleep(0.05)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return "killed"
    return f"exited {proc.returncode}"


# --- training ------------------------------------------------------------------------------
def metric_lines(run: Path) -> list[dict]:
    """Complete rows of metrics.jsonl; only the last line may be torn (killed mid-append)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    return [json.loads(line) for line in lines[:-1]]  # lines[-1]: "" or a torn row


def check_run(run: Path, why: str) -> int | None:
    """Every checkpoint the run exposes verifies; metrics.jsonl holds every row of its history
    with steps increasing. Returns the step of last/ (None: no checkpoint was saved yet)."""
    rows = metric_lines(run)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"{why}: duplicated or unordered rows {steps}"
    step = None
    for name in ("last", "best"):
        try:
            where = ckpt.resolve(run / name)  # itself, or a crash's newest complete copy
        except ckpt.CheckpointError:
            continue  # not saved yet
        c = ckpt.read(where)  # verifies every file against state.json
        missing = [r["step"] for r in c.state.get("history", []) if r not in rows]
        assert not missing, f"{why}: {name}/ recorded rows missing from metrics: {missing}"
        step = c.step if name == "last" else step
    return step


def saved_since(run: Path, since: float):
    """True once this launch saved a checkpoint (last/ is swapped in at every save)."""
    def ready() -> bool:
        try:
            return (run / "last" / "state.json").stat().st_mtime >= since
        except FileNotFoundError:
            return False
    return ready


@needs_mnist
def test_training_survives_sigkill_at_random_moments(tmp_path):
    rng, run = random.Random(SEED), tmp_path / "run"
    log = [f"seed {SEED} (VAE_SIGKILL_SEED reruns it)"]
    for i in range(3):
        resume = ("--resume",) if check_run(run, str(log)) is not None else ("--overwrite",)
        delay = round(rng.uniform(0.0, 2.5), 2)
        since = time.time() - 0.05  # file times are coarser than time.time()
        proc = launch("engine.train", "--data-dir", DATA_DIR, "--out", str(run), *TRAIN,
                      *(resume if i else ()))
        outcome = kill_after(proc, delay, saved_since(run, since))
        err = proc.stderr.read()
        log.append(f"kill {i}: {' '.join(resume if i else ('new',))}, {delay}s after a save:"
                   f" {outcome}, step {check_run(run, f'seed {SEED}, {log}')}")
        assert outcome == "killed" or proc.returncode == 0, f"seed {SEED}, {log}: {err}"
    why = f"seed {SEED}, {log}"
    args = ("--resume",) if check_run(run, why) is not None else ("--overwrite",)
    proc = launch("engine.train", "--data-dir", DATA_DIR, "--out", str(run), *TRAIN, *args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{why}: the final {args[0]} failed: {err}"
    rows = metric_lines(run)
    assert [r["epoch"] for r in rows] == [1, 2], f"{why}: rows {rows}"
    assert rows == ckpt.read(run).state["history"], why
    assert (run / "test.json").exists() and check_run(run, why) == rows[-1]["step"]
    print("\n".join(log))


# --- export --------------------------------------------------------------------------------
def tiny_run(root: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    ckpt.save(root / f"run{seed}" / "last", build_model("mlp", hidden_dims=(8,),
                                                        latent_dim=2).eval())
    return root / f"run{seed}"


def which(out: Path, runs: dict[str, Path]) -> str:
    """The checkpoint the export dir samples like ('absent' when there is none)."""
    if manifest.settled(out) is None:
        assert not out.exists() or not any(out.iterdir()), f"{out} half-written"
        return "absent"
    got = Sampler.load(out, device="cpu").sample(4, seed=1)  # refuses a file whose SHA-256 differs
    for name, run in runs.items():  # the CPU's generator on both sides: seeds differ on CUDA
        if torch.allclose(got, Sampler.load(run, device="cpu").sample(4, seed=1), atol=1e-4):
            return name
    raise AssertionError(f"{out} samples like none of {sorted(runs)}")


def residue(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()
                  if p.name.endswith((".tmp", ".old")) or ".stage-" in p.name)


def staged(out: Path):
    """True once an exporter into `out` made its staging folder (the checkpoint is loaded)."""
    return lambda: any(p.name.startswith(f".{out.name}.stage-") for p in out.parent.iterdir())


def test_export_survives_sigkill_at_random_moments(tmp_path):
    rng = random.Random(SEED)
    runs = {"a": tiny_run(tmp_path, rng.randrange(2**31)),
            "b": tiny_run(tmp_path, rng.randrange(2**31) + 1)}
    out, fresh = tmp_path / "export", tmp_path / "fresh"
    t0 = time.monotonic()
    assert onnx_export.main([str(runs["a"]), "--out", str(out), *QUICK]) == 0
    window = time.monotonic() - t0  # export, parity and commit: where the kills land
    log = [f"seed {SEED}, an export takes {window:.1f}s after its checkpoint is loaded"]
    for i, (target, before) in enumerate([(fresh, "absent"), (out, "a"), (out, "a")]):
        delay = round(rng.uniform(0.0, 1.2) * window, 2)
        proc = launch("export.onnx", str(runs["b"]), "--out", str(target), *QUICK)
        outcome = kill_after(proc, delay, staged(target))
        got = which(target, runs)
        log.append(f"kill {i} ({target.name}) {delay}s after staging: {outcome} -> {got}")
        assert got in (before, "b"), log
    for target in (fresh, out):
        assert onnx_export.main([str(runs["b"]), "--out", str(target), *QUICK]) == 0, log
        assert which(target, runs) == "b" and manifest.complete(target), log
    assert residue(tmp_path) == [], log
    print("\n".join(log))
