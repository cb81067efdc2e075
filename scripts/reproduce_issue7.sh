#!/usr/bin/env bash
# Reproduce the issue-7 results in docs/results/ (CPU only):
#
#   VAE_DATA_DIR=/path/to/datasets scripts/reproduce_issue7.sh [SECTION|all]   (sections below)
#
# quality  dynamically binarized MNIST, MLP VAE 784-512-512-32, 40 epochs, then IWAE-1000 NLL
#          on the full (statically binarized) test set         -> docs/results/mnist_quality.json
# quality-long  the same for 100 epochs              -> docs/results/mnist_quality_100ep.json
# fmnist   2-D latent ConvVAE on Fashion-MNIST: latent grid + scatter -> docs/results/fmnist_*.png
# anomaly  leave-one-digit-out MNIST: 10 short trainings (--exclude-class C), ROC-AUC of the
#          held-out digit by -ELBO                   -> docs/results/anomaly_mnist.{json,md}
#          then the same models rescored (anomaly-complexity, anomaly-knn sections)
#                                    -> docs/results/anomaly_mnist_{complexity,latent-knn}.*
#          and latent-knn for k = 1..200 (anomaly-knn-k)   -> docs/results/anomaly_mnist_knn_k.json
# vq       two short VQ-VAE runs, same seed, with and without dead-code restart
#                                                    -> docs/results/vq_dead_codes.{json,md}
#
# OMP_NUM_THREADS=1: on a shared 2-core machine, 2 OpenMP threads per process oversubscribe the
# cores and one training step became ~13x slower (0.5 vs 6.7 steps/s measured); set it higher
# on a machine of your own.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${VAE_DATA_DIR:?set VAE_DATA_DIR to the folder holding MNIST/ and FashionMNIST/}"
export VAE_DATA_DIR OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/issue7}
RESULTS=docs/results
mkdir -p "$RUNS" "$RESULTS"

timed() {  # timed NAME CMD...: run CMD, append "NAME <seconds> s" to $RUNS/times.txt
  local name=$1 start=$SECONDS
  shift
  "$@"
  echo "$name $((SECONDS - start)) s" | tee -a "$RUNS/times.txt"
}

quality_long() {  # the same model and recipe, 100 epochs (470 s on an idle machine)
  timed quality-long-train $PY -m engine.train --preset mlp-mnist-large --binarize \
    --epochs 100 --batch-size 256 --lr 2e-3 --lr-schedule cosine --compile --seed 0 \
    --no-progress --overwrite --out "$RUNS/mnist-long"
  timed quality-long-iwae1000 $PY -m engine.evaluate "$RUNS/mnist-long" --iw-samples 1000 \
    --out "$RESULTS/mnist_quality_100ep.json"
}

quality() {
  timed quality-train $PY -m engine.train --preset mlp-mnist-large --binarize --epochs 40 \
    --batch-size 256 --lr 2e-3 --lr-schedule cosine --compile --seed 0 --no-progress \
    --overwrite --out "$RUNS/mnist-quality"
  timed quality-iwae1000 $PY -m engine.evaluate "$RUNS/mnist-quality" --iw-samples 1000 \
    --out "$RESULTS/mnist_quality.json"
  $PY -m engine.plot "$RUNS/mnist-quality"
  cp "$RUNS/mnist-quality/plots/curves.png" "$RESULTS/mnist_curves.png"
  cp "$RUNS/mnist-quality/plots/kl_per_dim.png" "$RESULTS/mnist_kl_per_dim.png"
  # the 11 active dims of the run in docs/results (see mnist_quality.json "activity_per_dim")
  $PY -m engine.sample traverse "$RUNS/mnist-quality" --index 0 \
    --dims 1 5 6 7 9 10 12 18 20 24 31 --k 3 --steps 9 --out "$RESULTS/mnist_traverse.png"
  $PY -m engine.sample interpolate "$RUNS/mnist-quality" --indices 0 1 --steps 10 \
    --method slerp --out "$RESULTS/mnist_interpolate_slerp.png"
}

fmnist() {
  timed fmnist-train $PY -m engine.train --model conv --preset conv-fmnist-2d \
    --dataset fashion-mnist --epochs 3 --batch-size 256 --compile --seed 0 --no-progress \
    --overwrite --out "$RUNS/fmnist-2d"
  $PY -m engine.sample grid "$RUNS/fmnist-2d" --dims 0 1 --range -2.5 2.5 --n 15 \
    --out "$RESULTS/fmnist_latent_grid.png"
  $PY -m engine.plot "$RUNS/fmnist-2d" --max-images 10000
  cp "$RUNS/fmnist-2d/plots/latent_scatter.png" "$RESULTS/fmnist_latent_scatter.png"
  $PY -m engine.evaluate "$RUNS/fmnist-2d" --out "$RESULTS/fmnist_2d.json"
}

anomaly() {
  local reports=()
  for c in 0 1 2 3 4 5 6 7 8 9; do
    timed "anomaly-train-$c" $PY -m engine.train --binarize --exclude-class "$c" --epochs 5 \
      --batch-size 256 --ema 0 --seed 0 --no-progress --overwrite --out "$RUNS/anomaly/no$c"
    timed "anomaly-eval-$c" $PY -m engine.evaluate "$RUNS/anomaly/no$c" --anomaly \
      --holdout-class "$c" --out "$RUNS/anomaly/no$c/anomaly.json"
    reports+=("$RUNS/anomaly/no$c/anomaly.json")
  done
  $PY -m engine.anomaly "${reports[@]}" --json "$RESULTS/anomaly_mnist.json" \
    --markdown "$RESULTS/anomaly_mnist.md"
  anomaly_rescore complexity
  anomaly_rescore latent-knn
}

anomaly_rescore() {  # anomaly_rescore SCORE: the same 10 models under --anomaly-score SCORE
  local score=$1 reports=()
  for c in 0 1 2 3 4 5 6 7 8 9; do
    $PY -m engine.evaluate "$RUNS/anomaly/no$c" --anomaly --holdout-class "$c" \
      --anomaly-score "$score" --out "$RUNS/anomaly/no$c/anomaly_$score.json"
    reports+=("$RUNS/anomaly/no$c/anomaly_$score.json")
  done
  $PY -m engine.anomaly "${reports[@]}" --json "$RESULTS/anomaly_mnist_$score.json" \
    --markdown "$RESULTS/anomaly_mnist_$score.md"
}

anomaly_knn_k() {  # the latent-knn score's sensitivity to k, same 10 models
  for k in 1 5 10 50 200; do
    local reports=()
    for c in 0 1 2 3 4 5 6 7 8 9; do
      $PY -m engine.evaluate "$RUNS/anomaly/no$c" --anomaly --holdout-class "$c" \
        --anomaly-score latent-knn --knn-k "$k" --out "$RUNS/anomaly/no$c/anomaly_knn_k$k.json"
      reports+=("$RUNS/anomaly/no$c/anomaly_knn_k$k.json")
    done
    $PY -m engine.anomaly "${reports[@]}" --json "$RUNS/anomaly/knn_k$k.json"
  done
  $PY - "$RUNS/anomaly" "$RESULTS/anomaly_mnist_knn_k.json" <<'EOF'
import json, sys
from pathlib import Path
rows = {k: json.loads(Path(sys.argv[1], f"knn_k{k}.json").read_text()) for k in (1, 5, 10, 50, 200)}
table = {k: {"mean_roc_auc": s["mean_roc_auc"],
             "per_class": {r["holdout_class"]: r["roc_auc"] for r in s["per_class"]}}
         for k, s in rows.items()}
Path(sys.argv[2]).write_text(json.dumps(table, indent=2) + "\n")
print("\n".join(f"k={k}: mean ROC-AUC {v['mean_roc_auc']:.3f}" for k, v in table.items()))
EOF
}

vq_train() {  # vq_train NAME DEAD_CODE_THRESHOLD: a preset registered for this run only
  $PY - "$1" "$2" "$RUNS/vq-$1" <<'EOF'
import sys
from engine.models import registry
from engine.train import main
name, threshold, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
registry.PRESETS[f"vq-{name}"] = ("vqvae", {"hidden_dim": 32, "num_res_blocks": 1,
                                            "num_codes": 256, "code_dim": 16,
                                            "dead_code_threshold": threshold})
sys.exit(main(["--model", "vqvae", "--preset", f"vq-{name}", "--max-steps", "600",
               "--epochs", "2", "--batch-size", "128", "--seed", "0", "--no-progress",
               "--overwrite", "--out", out]))
EOF
}

vq() {
  timed vq-train-plain vq_train plain 0
  timed vq-train-restart vq_train restart 1.0
  $PY -m engine.evaluate "$RUNS/vq-plain" --out "$RESULTS/vq_plain.json"
  $PY -m engine.evaluate "$RUNS/vq-restart" --out "$RESULTS/vq_restart.json"
  $PY - "$RESULTS" <<'EOF'
import json, sys
from pathlib import Path
res = Path(sys.argv[1])
rows = {name: json.loads((res / f"vq_{name}.json").read_text()) for name in ("plain", "restart")}
table = ["| run | dead-code restart | codes used (of 256) | dead codes | perplexity | recon BCE |",
         "|---|---|---|---|---|---|"]
for name, r in rows.items():
    vq = r["vq"]
    table.append(f"| {name} | {'threshold 1.0' if name == 'restart' else 'off'} |"
                 f" {vq['codes_used']} | {vq['dead_codes']} | {vq['perplexity']:.1f} |"
                 f" {r['reconstruction']['bce']:.1f} |")
(res / "vq_dead_codes.md").write_text("\n".join(table) + "\n")
(res / "vq_dead_codes.json").write_text(json.dumps(
    {k: {"vq": v["vq"], "reconstruction": v["reconstruction"]} for k, v in rows.items()},
    indent=2) + "\n")
print("\n".join(table))
EOF
}

case "${1:-all}" in
  quality) quality ;;
  quality-long) quality_long ;;
  fmnist) fmnist ;;
  anomaly) anomaly ;;
  anomaly-complexity) anomaly_rescore complexity ;;
  anomaly-knn) anomaly_rescore latent-knn ;;
  anomaly-knn-k) anomaly_knn_k ;;
  vq) vq ;;
  all) quality; quality_long; fmnist; anomaly; vq ;;
  *) echo "usage: $0 [quality|quality-long|fmnist|anomaly|anomaly-complexity|anomaly-knn|anomaly-knn-k|vq|all]" >&2; exit 2 ;;
esac
