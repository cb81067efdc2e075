"""Build a small decoder `.pt2` for the native-runner tests, through `python -m export.aoti`.

    python tests/native/make_package.py OUT_DIR [--hidden 64] [--latent 8] [--classes 0]
    # -> OUT_DIR/export/decoder.pt2 (pass it to cmake -DVAE_TEST_PACKAGE=...)

An MLP VAE (engine.models.build_model("mlp"), random weights, seeded) is saved as a checkpoint
(engine.checkpoint.save) and exported by the project's exporter, so the tests exercise the same
package format, metadata and dynamic batch that users get.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def make_package(out_dir: str | Path, hidden: int = 64, latent: int = 8, classes: int = 0,
                 seed: int = 0, timeout: float = 300) -> Path:
    """Checkpoint an MLP VAE under out_dir/run/last and export out_dir/export/decoder.pt2."""
    from engine.checkpoint import save
    from engine.models import build_model

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = build_model("mlp", hidden_dims=(hidden,), latent_dim=latent, num_classes=classes)
    ckpt = save(out_dir / "run" / "last", model)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run(
        [sys.executable, "-m", "export.aoti", str(ckpt), "--out", str(out_dir / "export"),
         "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"python -m export.aoti failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return out_dir / "export" / "decoder.pt2"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--latent", type=int, default=8)
    ap.add_argument("--classes", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(make_package(a.out_dir, a.hidden, a.latent, a.classes, a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
