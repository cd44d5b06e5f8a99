#!/usr/bin/env bash
# Run the whole recipe: generate -> mine -> train -> evaluate, with one recipe and the same overrides.
#
#   bash scripts/pipeline.sh RECIPE.yaml [--key value ...]
#   ACCELERATE_CONFIG=accelerate_configs/a100_bf16.yaml bash scripts/pipeline.sh recipes/my-run.yaml
#
# Every stage resumes when rerun (append-only outputs, training checkpoints), so after a crash or a
# kill the same command continues where it stopped. Stage summaries land in run_dir/<stage>_summary.json.
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: bash scripts/pipeline.sh RECIPE.yaml [--key value ...]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-accelerate_configs/cpu.yaml}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"   # idle OpenMP threads sleep instead of spinning

stage() { echo; echo "=== $1 ($(date +%H:%M:%S))"; }
start=$(date +%s)
stage "1/4 generate queries";  "$PY" scripts/gen_vllm.py "$@"
stage "2/4 mine negatives";    "$PY" scripts/mine_faiss.py "$@"
stage "3/4 train";             "$PY" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" scripts/train.py "$@"
stage "4/4 evaluate";          "$PY" scripts/eval_mteb.py "$@"
echo; echo "pipeline finished in $(( $(date +%s) - start ))s"
