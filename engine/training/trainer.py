"""The training loop behind `python -m engine.train`: set-up (`build_run`) and `Trainer`.

One step = forward, loss, backward and optimizer update, compiled as a whole with --compile.
The scheduled KL weight enters the step as tensors, so changing beta never recompiles.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from argparse import Namespace
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from engine import checkpoint as ckpt
from engine.data import DataBundle, build_image_data
from engine.data.crystals import build_crystal_data
from engine.losses import BetaSchedule, KLWeight, Objective
from engine.models.registry import (
    config_from_dict,
    config_to_dict,
    get_family,
    make_config,
    model_from_config,
)
from engine.training.batches import accumulate, batch_size, evaluate, move_to
from engine.training.options import objective_from_args, schedule_from_args
from engine.training.previews import write_previews
from engine.training.rundir import check_new_run, clear_run, retire_export
from engine.training.runlog import append_jsonl, json_safe, train_config, versions
from engine.training.state import rebuild_metrics, restore_training_state, training_state


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class Run:
    args: Namespace
    out: Path
    device: torch.device
    rank: int
    world_size: int
    data: DataBundle
    model: nn.Module
    objective: Objective
    schedule: BetaSchedule
    resume_from: ckpt.Checkpoint | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class LossModule(nn.Module):
    """model + objective as one module, so DDP sees the loss computation as its forward."""

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: Any, weight: KLWeight) -> tuple[Tensor, dict[str, Tensor]]:
        return self.model.training_loss(batch, self.objective, weight)


# --- set-up ---------------------------------------------------------------------------------
def init_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available() and (device_arg is None or device_arg.startswith("cuda"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(device_arg if device_arg and ":" in device_arg else f"cuda:{local}")
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_arg or "cpu")
    return rank, world_size, device


def build_data(args: Namespace, family: str, rank: int, world: int, device) -> DataBundle:
    if family == "crystal":
        return build_crystal_data(args.dataset, batch_size=args.batch_size,
                                  max_atoms=args.max_atoms, seed=args.seed,
                                  num_workers=args.num_workers, niggli=args.niggli,
                                  augment_translate=args.augment_translate,
                                  rank=rank, world_size=world)
    return build_image_data(args.dataset, data_dir=args.data_dir, batch_size=args.batch_size,
                            eval_batch_size=args.eval_batch_size, pad_to_32=args.pad_to_32,
                            binarize=args.binarize, seed=args.seed, rank=rank,
                            world_size=world, device=device,
                            exclude_classes=tuple(args.exclude_class))


def model_overrides(args: Namespace, family: str, info: dict[str, Any]) -> dict[str, Any]:
    """Config fields that come from the data (channels, size, classes) and from flags."""
    fields = {f.name for f in dataclasses.fields(get_family(family).config_cls)}
    wanted = {"latent_dim": args.latent_dim, "hidden_dims": args.hidden_dims,
              "output": "sigmoid" if args.loss == "bce" else None}
    for key in ("in_channels", "image_size"):
        wanted[key] = info.get(key)
    wanted.update(info.get("model_overrides", {}))  # e.g. crystal: max_atoms, lattice stats
    if family.startswith("cvae"):
        wanted["num_classes"] = info.get("num_classes")
    return {k: v for k, v in wanted.items() if k in fields and v is not None}


def build_run(args: Namespace) -> Run:
    rank, world, device = init_distributed(args.device)
    out = Path(args.out or f"runs/{args.model or 'mlp'}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not args.resume:
        check_new_run(out, getattr(args, "overwrite", False))
    resume_from = ckpt.read(out) if args.resume else None
    family = resolve_family(args, resume_from)
    check_objective(args, get_family(family).model_cls)
    torch.manual_seed(args.seed + rank)
    data = build_data(args, family, rank, world, device)
    if resume_from is not None:
        model = model_from_config(resume_from.config["model"])
    else:
        model = get_family(family).model_cls(
            make_config(family, args.preset, **model_overrides(args, family, data.info)))
    check_loss_matches(args, model)
    return Run(args, out, device, rank, world, data, model.to(device),
               objective_from_args(args, data.info.get("dataset_size", 60_000)),
               schedule_from_args(args),
               resume_from)


def resolve_family(args: Namespace, resume_from: ckpt.Checkpoint | None) -> str:
    if resume_from is None:
        return get_family(args.model or "mlp").name
    saved = resume_from.config.get("model", {}).get("family")
    config_from_dict(resume_from.config["model"])  # validates the stored config
    if args.model is not None and args.model != saved:
        raise ckpt.CheckpointError(
            f"{resume_from.path} is a checkpoint of a {saved!r} model, but --model {args.model}"
            f" was given; drop --model to resume it, or choose another --out"
        )
    return saved


def check_objective(args: Namespace, model: type) -> None:
    """Refuse flags the `model` class's training_loss would ignore (what is recorded is what
    ran); before any data is loaded."""
    name = model.__name__
    if not getattr(model, "objectives", ("elbo",)):
        raise ValueError(f"the {name} is served, not trained, by this engine (fine-tuning a"
                         " latent-diffusion VAE needs perceptual and adversarial losses it does"
                         " not have); load its weights with engine.sample / export.onnx instead")
    if args.objective not in getattr(model, "objectives", ("elbo",)):
        raise ValueError(f"--objective {args.objective} does not apply to the {name}: it trains"
                         f" on its own loss (objectives: {', '.join(model.objectives)})")
    if not getattr(model, "has_kl", True) and (args.beta != 1.0 or args.beta_schedule
                                               != "constant"):
        raise ValueError(f"--beta and --beta-schedule weight a KL term, which the {name} does"
                         " not have: drop them")


def check_loss_matches(args: Namespace, model: nn.Module) -> None:
    if args.loss == "bce" and getattr(model.config, "output", "sigmoid") != "sigmoid":
        raise ValueError("--loss bce needs a sigmoid output; this model's output is"
                         f" {model.config.output!r}: use --loss mse or a sigmoid preset")


# --- the step -------------------------------------------------------------------------------
def make_step(loss_module: nn.Module, optimizer, scheduler, args: Namespace, device):
    """forward + loss + backward + optimizer update (+ LR schedule): one callable."""
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    params = [p for p in loss_module.parameters() if p.requires_grad]

    def step(batch: Any, weight: KLWeight) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, parts = loss_module(batch, weight)
        scaler.scale(loss).backward()
        if args.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), parts

    compiled = torch.compile(step, mode=args.compile_mode) if args.compile else step

    def step_and_schedule(batch: Any, weight: KLWeight):
        result = compiled(batch, weight)
        scheduler.step()
        return result

    return step_and_schedule, scaler


def lr_lambda(args: Namespace, total_steps: int):
    def factor(step: int) -> float:
        if args.warmup_steps and step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        if args.lr_schedule == "cosine":
            progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


# --- the loop -------------------------------------------------------------------------------
class Trainer:
    def __init__(self, run: Run) -> None:
        self.run, self.args = run, run.args
        args, model = run.args, run.model
        self.loss_module = LossModule(model, run.objective)
        self.ddp_module = self._wrap_ddp(self.loss_module)
        # A tensor LR keeps the compiled optimizer step from recompiling as the LR changes.
        lr = torch.tensor(args.lr) if args.compile else args.lr
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                           lr=lr, weight_decay=args.weight_decay)
        steps_per_epoch = len(run.data.train)
        self.total_steps = args.max_steps or args.epochs * steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(args, self.total_steps))
        self.ema = self._make_ema(model)
        self.step_fn, self.scaler = make_step(self.ddp_module, self.optimizer, self.scheduler,
                                              args, run.device)
        self.weight = KLWeight(torch.zeros((), device=run.device),
                               torch.zeros((), device=run.device))
        self.step, self.epoch, self.batch_in_epoch, self.best = 0, 0, 0, math.inf
        self.epoch_sums: dict[str, Tensor] = {}
        self.epoch_seen = 0
        self.history: list[dict[str, Any]] = []  # metrics.jsonl rows, saved in checkpoints
        if run.resume_from is not None:
            self._restore(run.resume_from)

    def _wrap_ddp(self, module: nn.Module) -> nn.Module:
        if self.run.world_size == 1:
            return module
        ids = [self.run.device.index] if self.run.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def _make_ema(self, model: nn.Module):
        if self.args.ema is None:
            return None
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.args.ema),
                             use_buffers=True)

    # --- public ---------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        run = self.run
        if run.is_main:
            self._prepare_out()
        while self.epoch < self.args.epochs and self.step < self.total_steps:
            train_metrics = self._train_epoch()
            self._end_epoch(train_metrics)
        return self._final_test()

    def _prepare_out(self) -> None:
        out = self.run.out
        if self.args.overwrite:
            clear_run(out)
        elif self.run.resume_from is not None and (moved := retire_export(out)) is not None:
            print(f"note: moved {out / 'export'} to {moved}: it was exported from the"
                  " checkpoints that this resumed run replaces")
        out.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_json(out / "config.json", self._config())
        rebuild_metrics(out / "metrics.jsonl", self.history, self.step)

    # --- epochs ---------------------------------------------------------------------------
    def _train_epoch(self) -> dict[str, float]:
        run, loader = self.run, self.run.data.train
        start = self.batch_in_epoch
        batches = self._batches(loader, start)
        if start == 0:
            self.epoch_sums, self.epoch_seen = {}, 0
        sums, seen, t0 = self.epoch_sums, 0, time.perf_counter()
        bar = tqdm(batches, total=len(loader) - start, desc=f"epoch {self.epoch + 1}",
                   disable=not run.is_main or self.args.no_progress, leave=False)
        for batch in bar:
            batch = move_to(batch, run.device)
            beta, capacity = run.schedule(self.step)
            self.weight.beta.fill_(beta)
            self.weight.capacity.fill_(capacity)
            loss, parts = self.step_fn(batch, self.weight)
            if self.ema is not None:
                self.ema.update_parameters(run.model)
            accumulate(sums, {"loss": loss, **parts})
            self.step, self.batch_in_epoch, seen = self.step + 1, self.batch_in_epoch + 1, seen + 1
            self.epoch_seen += 1
            if self.step % self.args.log_every == 0 or self.step >= self.total_steps:
                self._check_finite(sums)
                bar.set_postfix(loss=f"{sums['loss'].item() / self.epoch_seen:.3f}",
                                beta=f"{beta:.3g}")
            if self.args.ckpt_every and self.step % self.args.ckpt_every == 0:
                self._check_finite(sums)
                self._save("last")
            if self.step >= self.total_steps:
                break
        self._check_finite(sums)
        elapsed = time.perf_counter() - t0
        # Averages over every batch of the epoch, those before a mid-epoch resume included.
        metrics = {f"train_{k}": v.item() / max(self.epoch_seen, 1) for k, v in sums.items()}
        metrics.update(steps_per_s=seen / elapsed, images_per_s=seen * batch_size(batch) / elapsed
                       if seen else 0.0, lr=float(self.scheduler.get_last_lr()[0]))
        return metrics

    def _batches(self, loader, start: int):
        """This epoch's batches from `start` on: loaders that can skip do it without loading."""
        if hasattr(loader, "start_batch"):
            loader.set_epoch(self.epoch, start)
            return iter(loader)
        loader.set_epoch(self.epoch)
        return islice(iter(loader), start, None)

    def _end_epoch(self, train_metrics: dict[str, float]) -> None:
        run = self.run
        finished_epoch = self.batch_in_epoch >= len(run.data.train)
        if run.is_main:
            val = evaluate(self.eval_model(), run.data.val, run.objective, run.device)
            row = {"epoch": self.epoch + 1, "step": self.step, **train_metrics,
                   **{f"val_{k}": v for k, v in val.items()}, "beta": run.schedule(self.step)[0]}
            append_jsonl(run.out / "metrics.jsonl", row)
            self.history.append(json_safe(row))
            write_previews(self.eval_model(), run.data.val, run.out, self.epoch + 1, run.device)
            if finished_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            if val["loss"] < self.best:
                self.best = val["loss"]
                self._save("best")
            self._save("last")
        elif finished_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if dist.is_initialized():
            dist.barrier()

    def _final_test(self) -> dict[str, float]:
        run = self.run
        if not run.is_main:
            return {}
        best = ckpt.resolve(run.out / "best")
        model, _ = ckpt.load_model(best, ema=self.ema is not None, device=run.device)
        test = evaluate(model, run.data.test, run.objective, run.device)
        test["checkpoint"] = str(best)
        ckpt.atomic_write_json(run.out / "test.json", test)
        print("test (best checkpoint): " + "  ".join(
            f"{k}={v:.4f}" for k, v in test.items() if isinstance(v, float)))
        return test

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.run.model

    def _check_finite(self, sums: dict[str, Tensor]) -> None:
        if "loss" in sums and not torch.isfinite(sums["loss"]).item():
            last = self.run.out / "last"
            kept = f"the last good checkpoint is kept at {last}" if last.exists() else \
                "no checkpoint was written yet"
            raise TrainingDiverged(
                f"loss became NaN/inf by step {self.step} (epoch {self.epoch + 1}); training"
                f" stopped and {kept}. Try a lower --lr, --grad-clip 1.0, or --amp off"
            )

    # --- checkpoints ----------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {"model": config_to_dict(self.run.model.config), "train": train_config(self.args),
                "data": self.run.data.info, "versions": versions()}

    def _save(self, name: str) -> None:
        run = self.run
        if not all(torch.isfinite(p).all() for p in run.model.parameters()):
            raise TrainingDiverged(
                f"parameters became NaN/inf at step {self.step}; not overwriting {name}/ (the"
                " last good checkpoint is kept). Try a lower --lr or --grad-clip 1.0")
        state, tensors = training_state(self)
        ckpt.save(run.out / name, run.model, train_config=train_config(self.args),
                  ema=self.ema.module if self.ema is not None else None,
                  extra_state=state, extra_tensors=tensors)

    def _restore(self, c: ckpt.Checkpoint) -> None:
        restore_training_state(self, c)
        if self.run.is_main:
            print(f"resumed from {c.path} at step {self.step} (epoch {self.epoch + 1},"
                  f" batch {self.batch_in_epoch})")
