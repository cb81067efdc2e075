"""Training: the `Trainer` (run directory, compiled step, EMA, DDP, resume), its batch helpers,
the run log (config.json, metrics.jsonl) and the per-epoch previews.

`python -m engine.train` parses flags and calls `build_run` and `Trainer` from here.
"""

from engine.training.trainer import Trainer, TrainingDiverged, build_run

__all__ = ["Trainer", "TrainingDiverged", "build_run"]
