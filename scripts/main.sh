#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up .venv, train a small MLP VAE on MNIST
# with the whole training step under torch.compile, export it to ONNX (with its parity check),
# and sample image grids from the checkpoint and from the exported decoder.
# Outputs land in runs/quickstart/ (override with OUT=...; EPOCHS=... for a longer run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
OUT=${OUT:-runs/quickstart}
EPOCHS=${EPOCHS:-3}
PY=.venv/bin/python

$PY -m engine.train --model mlp --dataset mnist --epochs "$EPOCHS" --compile --out "$OUT" \
    --overwrite --no-progress
$PY -m engine.sample "$OUT" --n 64 --seed 0 --out "$OUT/samples_checkpoint.png"
$PY -m export.onnx "$OUT" --out "$OUT/export"
$PY -m engine.sample "$OUT/export/decoder.onnx" --n 64 --seed 0 --out "$OUT/samples_onnx.png"
echo "done: $OUT/samples_checkpoint.png, $OUT/samples_onnx.png, $OUT/export/"
