"""What a training checkpoint holds beyond the weights, and how a resumed run gets it back.

state.json (JSON) and state.safetensors (tensors) of `last/` and `best/` record:
  step, epoch, batch_in_epoch, best     where training stands
  optimizer, scheduler, scaler, RNG     so the next step is the one an unbroken run takes
  epoch_sums, epoch_seen                the running train sums of a partly done epoch, so the
                                        epoch's train metrics after a mid-epoch resume average
                                        over all of its batches, not only those after the resume
  history                               every metrics.jsonl row up to this checkpoint, so a torn
                                        or truncated metrics.jsonl is rebuilt on resume
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine import checkpoint as ckpt
from engine.training.runlog import json_safe, read_jsonl


def training_state(trainer: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(JSON state, tensors) of a Trainer, for engine.checkpoint.save."""
    tensors: dict[str, Tensor] = {}
    state = {
        "step": trainer.step, "epoch": trainer.epoch, "batch_in_epoch": trainer.batch_in_epoch,
        "best": trainer.best if math.isfinite(trainer.best) else None,
        "optimizer": ckpt.split_state(trainer.optimizer.state_dict(), "optimizer", tensors),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "epoch_sums": {k: float(v) for k, v in trainer.epoch_sums.items()},
        "epoch_seen": trainer.epoch_seen,
        "history": trainer.history,
    }
    tensors["rng.cpu"] = torch.get_rng_state()
    if trainer.run.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(trainer.run.device)
    if trainer.ema is not None:
        tensors["ema.n_averaged"] = trainer.ema.n_averaged.detach().cpu()
    return json_safe(state), tensors


def restore_training_state(trainer: Any, c: ckpt.Checkpoint) -> None:
    """Load weights, optimizer, schedule, RNG and counters of checkpoint `c` into `trainer`."""
    run = trainer.run
    ckpt.load_weights(run.model, ckpt.read_tensors(c, "model.safetensors"), c.path)
    tensors = ckpt.read_tensors(c, "state.safetensors")
    trainer.optimizer.load_state_dict(
        ckpt.optimizer_state_from_json(c.state["optimizer"], tensors))
    trainer.scheduler.load_state_dict(c.state["scheduler"])
    trainer.scaler.load_state_dict(c.state.get("scaler", {}) or trainer.scaler.state_dict())
    set_learning_rate(trainer.optimizer, trainer.scheduler, trainer.args.lr)
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and run.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], run.device)
    if trainer.ema is not None and (c.path / "ema.safetensors").exists():
        ckpt.load_weights(trainer.ema.module, ckpt.read_tensors(c, "ema.safetensors"), c.path)
        trainer.ema.n_averaged.copy_(tensors["ema.n_averaged"])
    trainer.step, trainer.epoch = c.state["step"], c.state["epoch"]
    trainer.batch_in_epoch = c.state["batch_in_epoch"]
    trainer.best = c.state["best"] if c.state.get("best") is not None else math.inf
    if trainer.batch_in_epoch:
        trainer.epoch_sums = {k: torch.tensor(v, device=run.device)
                              for k, v in c.state.get("epoch_sums", {}).items()}
        trainer.epoch_seen = int(c.state.get("epoch_seen", 0))
    trainer.history = list(c.state.get("history", []))


def set_learning_rate(optimizer: Any, scheduler: Any, lr: float) -> None:
    """Make `lr` the base rate (what --lr says), keeping the schedule's position: the restored
    optimizer otherwise keeps the rate it was saved with, whatever --lr the resume gives."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, _factors(scheduler)):
        group["initial_lr"] = lr
        if isinstance(group["lr"], Tensor):  # a tensor LR under --compile
            group["lr"].fill_(lr * factor)
        else:
            group["lr"] = lr * factor


def _factors(scheduler: Any) -> list[float]:
    return [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]


def rebuild_metrics(path: Path, history: list[dict[str, Any]], step: int) -> None:
    """metrics.jsonl as of the checkpoint: its rows up to `step`, rows missing from the file
    (a torn or lost line) restored from the checkpoint's history, later rows dropped (they
    are recomputed). Rewritten atomically, and only when it changes."""
    rows = read_jsonl(path) if path.exists() else []
    kept = {r["step"]: r for r in rows if isinstance(r.get("step"), int) and r["step"] <= step}
    for row in history:
        kept.setdefault(row["step"], row)
    text = "".join(json.dumps(kept[s]) + "\n" for s in sorted(kept))
    if not path.exists() or path.read_text() != text:
        ckpt.atomic_write_bytes(path, text.encode())
