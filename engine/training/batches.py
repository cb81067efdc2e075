"""Batch plumbing shared by the trainer and the evaluator: moving batches to a device, their
size, running sums of loss parts, and the mean of every part over a split."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from engine.losses import KLWeight, Objective


@torch.no_grad()
def evaluate(model: nn.Module, loader, objective: Objective, device) -> dict[str, float]:
    """Mean of every loss part over a split, with beta = 1 (the true ELBO)."""
    was_training = model.training
    model.eval()
    eval_objective = dataclasses.replace(objective, kind="elbo", capacity=False)
    weight = KLWeight(torch.ones((), device=device), torch.zeros((), device=device))
    sums: dict[str, Tensor] = {}
    count = 0
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(0)
    for batch in loader:
        batch = move_to(batch, device)
        n = batch_size(batch)
        loss, parts = model.training_loss(batch, eval_objective, weight)
        accumulate(sums, {"loss": loss, **parts}, scale=n)
        count += n
    model.train(was_training)
    return {k: v.item() / max(count, 1) for k, v in sums.items() if k != "beta"}


def accumulate(sums: dict[str, Tensor], parts: dict[str, Tensor], scale: float = 1.0) -> None:
    for k, v in parts.items():
        v = v.detach().float() * scale
        sums[k] = sums[k] + v if k in sums else v


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(b, device) for b in batch)
    return batch.to(device, non_blocking=True) if hasattr(batch, "to") else batch


def batch_size(batch: Any) -> int:
    if isinstance(batch, (tuple, list)):
        return batch_size(batch[0])
    if hasattr(batch, "num_graphs"):
        return int(batch.num_graphs)
    return int(batch.shape[0]) if isinstance(batch, Tensor) else len(batch)
