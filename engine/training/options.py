"""The training objects that `python -m engine.train`'s flags describe: the objective and the
beta schedule (engine.losses), built from the parsed namespace."""

from __future__ import annotations

from argparse import Namespace

from engine.losses import BetaSchedule, Objective


def objective_from_args(args: Namespace, dataset_size: int) -> Objective:
    return Objective(recon=args.loss, kind=args.objective, tc_alpha=args.tc_alpha,
                     tc_gamma=args.tc_gamma, dataset_size=dataset_size,
                     iw_samples=args.iw_samples, capacity=args.beta_schedule == "capacity")


def schedule_from_args(args: Namespace) -> BetaSchedule:
    return BetaSchedule(kind=args.beta_schedule, beta_start=args.beta_start, beta_end=args.beta,
                        beta_steps=args.beta_steps, cycles=args.beta_cycles,
                        ratio=args.beta_ratio, capacity_max=args.capacity_max)
