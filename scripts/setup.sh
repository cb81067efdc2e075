#!/usr/bin/env bash
# Create .venv with the pinned stack (constraints.txt pins torch==2.14.1, torchvision==0.29.1
# and everything else) and install vae-engine in editable mode with the cpu, crystal and dev
# extras. Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt \
    -e ".[cpu,crystal,dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, torchvision, onnxruntime, pymatgen; print('torch', torch.__version__, '| torchvision', torchvision.__version__)"
