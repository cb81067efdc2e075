#!/usr/bin/env bash
# Set up the environment and run the whole test suite (what CI runs through .ci/run).
# The kernel tests run in their own process: TRITON_INTERPRET=1 must be set before triton is
# imported, and it must not leak into the other tests (they exercise the CPU reference path).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
.venv/bin/ruff check engine kernels export benchmarks tests
.venv/bin/python -m pytest tests -q -p no:cacheprovider --ignore=tests/kernels "$@"
TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/kernels -q -p no:cacheprovider "$@"
