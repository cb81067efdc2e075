"""Reconstruction metrics with pymatgen's StructureMatcher, following CDVAE (Xie et al. 2022,
https://arxiv.org/abs/2110.06197):

    match rate = matched pairs / all pairs      (an invalid or unbuildable prediction is a miss)
    RMSE       = mean over matched pairs of StructureMatcher.get_rms_dist(pred, gt)[0]
                 (normalised by (V / n)^(1/3), as pymatgen defines it)

Matching runs in a process pool ("spawn", so no forked torch state); each pair has its own
timeout (SIGALRM inside the worker), and a pair that times out counts as a miss.
"""

from __future__ import annotations

import multiprocessing
import signal
from dataclasses import dataclass

import numpy as np

from engine.crystal.structures import is_valid, make_structure

MATCHER_KW = {"stol": 0.5, "angle_tol": 10, "ltol": 0.3}

# A pair is sent to the workers as plain arrays: (Z, frac, lengths, angles) or None.
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass
class MatchResult:
    matched: bool
    rms: float | None
    valid: bool
    timed_out: bool = False


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Timeout()


def match_pair(args: tuple[Arrays | None, Arrays, float]) -> MatchResult:
    """Match one (prediction, ground truth) pair; runs in a worker."""
    from pymatgen.analysis.structure_matcher import StructureMatcher


    pred_arr, gt_arr, timeout = args
    pred = make_structure(*pred_arr) if pred_arr is not None else None
    valid = is_valid(pred)
    if not valid:
        return MatchResult(False, None, False)
    gt = make_structure(*gt_arr)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        rms = StructureMatcher(**MATCHER_KW).get_rms_dist(pred, gt)
    except _Timeout:
        return MatchResult(False, None, True, timed_out=True)
    except Exception:  # noqa: BLE001 - pymatgen can fail on degenerate cells: a miss
        rms = None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return MatchResult(rms is not None, None if rms is None else float(rms[0]), True)


def match_structures(preds: list[Arrays | None], gts: list[Arrays], num_workers: int = 2,
                     timeout: float = 30.0) -> list[MatchResult]:
    """MatchResult per pair, in order."""
    if len(preds) != len(gts):
        raise ValueError(f"got {len(preds)} predictions for {len(gts)} ground truths")
    jobs = [(p, g, timeout) for p, g in zip(preds, gts)]
    if num_workers <= 1:
        return [match_pair(j) for j in jobs]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_workers) as pool:
        return pool.map(match_pair, jobs, chunksize=max(1, len(jobs) // (8 * num_workers)))


def summarize(results: list[MatchResult]) -> dict[str, float]:
    n = max(len(results), 1)
    rms = [r.rms for r in results if r.matched]
    return {"match_rate": sum(r.matched for r in results) / n,
            "rmse": float(np.mean(rms)) if rms else float("nan"),
            "valid_fraction": sum(r.valid for r in results) / n,
            "timeouts": sum(r.timed_out for r in results), "pairs": len(results)}
