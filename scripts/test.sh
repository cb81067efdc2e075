#!/usr/bin/env bash
# Set up the environment and run the whole test suite (what CI runs through .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
.venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
