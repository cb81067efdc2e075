#!/usr/bin/env bash
# The GPU checks of issue 16 in one call of the device tool (an H100/H200 with torch 2.11):
#   1. tests/faults/test_gpu_faults.py (the `cuda` tests: finite checks, memory refusals, a real
#      CUDA out-of-memory, GPU indices, a GPU run that survives an OOM and resumes on the CPU);
#   2. benchmarks/gpu_finite_check.py (what the finite check costs per decode);
#   3. the rest of tests/faults on a machine that has a GPU (tests must not assume none).
# Writes under $OUT (default gpu-out/). MNIST: $VAE_DATA_DIR (default .devdata, carried).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 VAE_DATA_DIR=${VAE_DATA_DIR:-$PWD/.devdata}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, onnxruntime as o; print('torch', torch.__version__,
'| triton', triton.__version__, '| onnxruntime', o.__version__, o.get_available_providers())"
  git rev-parse HEAD 2>/dev/null || true; } > "$OUT/device.txt" 2>&1
timeout 180 python3 -m pytest -p no:cacheprovider -q -rA tests/faults/test_gpu_faults.py \
    --junitxml="$OUT/gpu_faults.xml" > "$OUT/gpu_faults.log" 2>&1
echo "gpu faults: rc=$?"
timeout 120 python3 benchmarks/gpu_finite_check.py --out "$OUT" > "$OUT/finite_check.log" 2>&1
echo "finite check benchmark: rc=$?"
timeout 150 python3 -m pytest -p no:cacheprovider -q -rfEs -n 8 tests/faults \
    --ignore=tests/faults/test_gpu_faults.py > "$OUT/faults_suite.log" 2>&1
echo "fault suite: rc=$?"
cat "$OUT/device.txt"; tail -n 25 "$OUT/gpu_faults.log"; tail -n 12 "$OUT/finite_check.log"
tail -n 30 "$OUT/faults_suite.log"
