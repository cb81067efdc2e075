"""What `python -m engine.train`'s flags mean: the objective and the beta schedule they describe
(engine.losses), the checks that turn a bad value into a one-line error, and how a resumed run
merges its saved configuration with the flags given again."""

from __future__ import annotations

import math
import os
from argparse import SUPPRESS, ArgumentParser, Namespace
from collections.abc import Callable, Sequence
from typing import Any

import torch

from engine import checkpoint as ckpt
from engine.losses import BetaSchedule, Objective
from engine.models.registry import FAMILIES, training_recipe
from engine.runtime import checks as runtime_checks


def objective_from_args(args: Namespace, dataset_size: int) -> Objective:
    return Objective(recon=args.loss, kind=args.objective, tc_alpha=args.tc_alpha,
                     tc_gamma=args.tc_gamma, dataset_size=dataset_size,
                     iw_samples=args.iw_samples, capacity=args.beta_schedule == "capacity")


def schedule_from_args(args: Namespace) -> BetaSchedule:
    return BetaSchedule(kind=args.beta_schedule, beta_start=args.beta_start, beta_end=args.beta,
                        beta_steps=args.beta_steps, cycles=args.beta_cycles,
                        ratio=args.beta_ratio, capacity_max=args.capacity_max)


# --- checks of the flags ---------------------------------------------------------------------
# (flag, smallest allowed value): sizes and intervals that 0 or a negative value would break.
MINIMUMS = (("batch_size", 1), ("eval_batch_size", 1), ("log_every", 1), ("ckpt_every", 0),
            ("epochs", 0), ("max_steps", 1), ("iw_samples", 1), ("warmup_steps", 0),
            ("num_workers", 0), ("max_atoms", 1), ("latent_dim", 1), ("beta_steps", 1),
            ("beta_cycles", 1))
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune",
                 "max-autotune-no-cudagraphs")  # torch.compile(mode=...)
# Weights of the objective and the optimizer: finite and >= 0 (a negative KL weight rewards a
# posterior far from the prior; training "works" and the ELBO it reports is wrong).
NON_NEGATIVE = ("beta", "beta_start", "capacity_max", "tc_alpha", "tc_gamma", "weight_decay")


def check_args(args: Namespace) -> None:
    """One-line ValueErrors for flag values that would otherwise fail deep inside torch."""
    for name, low in MINIMUMS:
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if args.hidden_dims is not None and (not args.hidden_dims or min(args.hidden_dims) < 1):
        raise ValueError(f"--hidden-dims must be positive sizes such as 512,256; got"
                         f" {args.hidden_dims}")
    for name in NON_NEGATIVE:
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got"
                             f" {value}")
    if not 0 < args.beta_ratio <= 1:
        raise ValueError(f"--beta-ratio is the rising part of each cycle, in (0, 1]; got"
                         f" {args.beta_ratio}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    if args.ema is not None and not 0 < args.ema < 1:
        raise ValueError(f"--ema is a decay in (0, 1) such as 0.999, got {args.ema}")
    if args.grad_clip is not None and not args.grad_clip > 0:
        raise ValueError(f"--grad-clip must be > 0, got {args.grad_clip}")
    if args.compile and args.compile_mode not in COMPILE_MODES:
        raise ValueError(f"--compile-mode {args.compile_mode!r}: expected one of"
                         f" {', '.join(m for m in COMPILE_MODES if m)}")
    if args.kernels == "triton" and not os.environ.get("TRITON_INTERPRET") and (
            args.device == "cpu" or (args.device is None and not torch.cuda.is_available())):
        raise ValueError("--kernels triton on the CPU needs Triton's interpreter: set"
                         " TRITON_INTERPRET=1, or use --kernels torch (the default on the CPU)")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues a run and --overwrite replaces it: give one of them")
    check_device(args.device)


def check_device(device: str | None) -> None:
    """`None`, "cpu", "cuda" or "cuda:N" for a GPU that exists here."""
    runtime_checks.check_device(device, "--device")


# --- resuming -------------------------------------------------------------------------------
# Flags that may differ on --resume: how long and where to run, not what is trained. Every other
# flag comes from the run's config.json, so that what is recorded is what runs.
RESUME_MAY_CHANGE = frozenset({
    "epochs", "max_steps", "lr", "device", "compile", "compile_mode", "kernels", "ckpt_every",
    "log_every", "no_progress", "num_workers", "eval_batch_size", "data_dir", "out", "resume",
    "overwrite",
})


def given_flags(parser: ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The destinations of the flags that `argv` sets explicitly (defaults suppressed)."""
    for action in parser._actions:
        action.default = SUPPRESS
    return set(vars(parser.parse_args(list(argv))))


def resumed_args(args: Namespace, given: set[str], saved: dict[str, Any]) -> Namespace:
    """`args` with every flag not given on the command line taken from the saved run config;
    a given flag outside RESUME_MAY_CHANGE that differs from the saved value is refused."""
    changed = sorted(k for k in given - RESUME_MAY_CHANGE
                     if k in saved and _same_type(getattr(args, k), saved[k]) != getattr(args, k))
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} (saved {saved[k]!r}, given"
                          f" {getattr(args, k)!r})" for k in changed)
        raise ValueError(f"--resume continues the run as configured and cannot change {flags};"
                         " drop those flags, or start a new run (another --out, or --overwrite)")
    merged = dict(vars(args))
    for key, value in saved.items():
        if key in merged and key not in given:
            merged[key] = _same_type(merged[key], value)
    return Namespace(**merged)


def _same_type(current: Any, saved: Any) -> Any:
    """JSON turns tuples into lists: give a saved list the type of the parsed value."""
    return tuple(saved) if isinstance(current, tuple) and isinstance(saved, list) else saved


def parse_train_args(make_parser: Callable[[], ArgumentParser],
                     argv: Sequence[str]) -> Namespace:
    """Parse and check the flags; on --resume, fill every flag not given from the checkpoint's
    saved training config (refusing changes to what is trained)."""
    args = make_parser().parse_args(list(argv))
    given = given_flags(make_parser(), argv)
    if args.ema == 0:
        args.ema = None  # --ema 0 turns off a recipe's EMA
    check_args(args)
    if not args.resume:
        return with_recipe(args, given)
    if args.out is None:
        raise ValueError("--resume needs --out RUN_DIR: the run directory to continue")
    # Unverified here: build_run reads (and hashes) the same checkpoint before training.
    saved = ckpt.read(args.out, verify=False).config.get("train", {})
    return resumed_args(args, given, saved)


def with_recipe(args: Namespace, given: set[str]) -> Namespace:
    """The preset's recorded training flags (engine.models Family.recipes) for the flags that
    were not given: the defaults reproduce the README's results."""
    if args.model is not None and args.model not in FAMILIES:
        return args  # the unknown name is reported, with the valid ones, when the run is built
    recipe = training_recipe(args.model or "mlp", args.preset)
    return Namespace(**{**vars(args), **{k: v for k, v in recipe.items() if k not in given}})
