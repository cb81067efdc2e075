"""What the latent explorer page (GET /, static/) needs beyond the spec: which latent dimensions
get sliders. With a KL-per-dimension report near the artifact, the most informative dims come
first (KL(q(z_d|x) || N(0, 1)) averaged over the test set: a dim with KL ~ 0 is ignored by the
decoder, so sliding it changes nothing); else the first `max_sliders` dims.

Reports looked for, in this order, in the artifact's directory and the one above it (an export
directory sits inside its run directory):
    evaluation/test.json, evaluation.json, test.json, report.json
each a JSON object with "kl_per_dim" (one float per latent element), as written by
`python -m engine.evaluate RUN --out RUN/evaluation/test.json`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

STATIC_DIR = Path(__file__).resolve().parent / "static"
REPORTS = ("evaluation/test.json", "evaluation.json", "test.json", "report.json")
MAX_SLIDERS = 16


def _search_dirs(artifact: Path) -> list[Path]:
    first = artifact if artifact.is_dir() else artifact.parent
    return [first, first.parent] if first.parent != first else [first]


def find_kl_per_dim(artifact: str | Path, size: int) -> tuple[list[float], Path] | None:
    """(KL per latent element, the report it came from), or None if no report matches `size`."""
    for directory in _search_dirs(Path(artifact)):
        for name in REPORTS:
            path = directory / name
            try:
                report = json.loads(path.read_text())
            except (OSError, ValueError):  # absent, unreadable or not JSON: try the next one
                continue
            kl = report.get("kl_per_dim") if isinstance(report, dict) else None
            if (isinstance(kl, list) and len(kl) == size
                    and all(isinstance(v, (int, float)) and math.isfinite(v) for v in kl)):
                return [float(v) for v in kl], path
    return None


def explorer_info(artifact: str | Path, latent_shape: tuple[int, ...], latent_kind: str,
                  max_sliders: int = MAX_SLIDERS) -> dict[str, Any]:
    """{"dims": flat latent indices that get sliders, most informative first, "kl": their KL
    (or null), "source": the report used (or null), "latent_size": prod(latent_shape), or
    null when the spec leaves an axis dynamic (None): the page then has no latent to draw}."""
    if not all(isinstance(d, int) and d > 0 for d in latent_shape):  # dynamic axes (None)
        return {"dims": [], "kl": None, "source": None, "latent_size": None}
    size = math.prod(latent_shape)
    if latent_kind != "gaussian":  # integer codes: no sliders, random codes only
        return {"dims": [], "kl": None, "source": None, "latent_size": size}
    found = find_kl_per_dim(artifact, size)
    if found is None:
        dims = list(range(min(size, max_sliders)))
        return {"dims": dims, "kl": None, "source": None, "latent_size": size}
    kl, path = found
    dims = sorted(range(size), key=lambda i: -kl[i])[:max_sliders]
    return {"dims": dims, "kl": [kl[i] for i in dims], "source": str(path), "latent_size": size}
