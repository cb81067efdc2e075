#!/usr/bin/env bash
# Create .venv with the pinned stack (constraints.txt pins torch==2.14.1, torchvision==0.29.1
# and everything else) and install vae-engine in editable mode with the cpu, crystal, serve and
# dev extras (dev brings the test oracles: diffusers, tritonclient, selenium).
# Debian's chromium and chromium-driver are installed for the browser test when missing and we
# are root (CI is); elsewhere that test skips with its reason. Idempotent: a second run only
# checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt \
    -e ".[cpu,crystal,serve,dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, torchvision, onnxruntime, pymatgen; print('torch', torch.__version__, '| torchvision', torchvision.__version__)"
if ! command -v chromedriver >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
        chromium-driver) >/dev/null 2>&1 || echo "warning: could not install chromium (apt)"
fi
