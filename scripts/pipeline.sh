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
# Progress bars are for a terminal: in a log file every redraw stays as a line and nested bars add
# escape codes. tqdm reads TQDM_DISABLE when imported, so this turns off every library's bars too;
# the stages log plain progress lines instead.
[[ -t 2 ]] || export TQDM_DISABLE="${TQDM_DISABLE:-1}"

# Check the recipe and the overrides for all four stages before anything runs or is written: a
# mistake is one `error:` line (exit 2) now, not a failure after minutes of generation. It also
# names the stages the recipe needs: no generation when nothing reads generated queries (a
# supervised recipe), no mining when no training stage reads run_dir/train.jsonl.
STAGES=$("$PY" -m embed.config "$@" | sed -n 's/^stages: //p')
echo "recipe ok | stages: $STAGES"
if [[ ! -f "$ACCELERATE_CONFIG" ]]; then
  echo "error: ACCELERATE_CONFIG=$ACCELERATE_CONFIG does not exist (see accelerate_configs/)" >&2
  exit 2
fi
# CPU threads per training process, as accelerate would choose them on a CPU (physical cores /
# processes); passing them keeps its "values were not passed" warning off every run.
THREADS="${NUM_CPU_THREADS_PER_PROCESS:-$("$PY" -c 'import sys, psutil, yaml
n = (yaml.safe_load(open(sys.argv[1])) or {}).get("num_processes") or 1
print(max(1, (psutil.cpu_count(logical=False) or 1) // n))' "$ACCELERATE_CONFIG")}"

stage() { echo; echo "=== $1 ($(date +%H:%M:%S))"; }
runs() { [[ " $STAGES " == *" $1 "* ]]; }
start=$(date +%s)
if runs gen; then stage "1/4 generate queries"; "$PY" scripts/gen_vllm.py "$@"; else stage "1/4 generate queries: not needed by this recipe"; fi
if runs mine; then stage "2/4 mine negatives"; "$PY" scripts/mine_faiss.py "$@"; else stage "2/4 mine negatives: not needed by this recipe"; fi
# --quiet: a failed single-process run ends with train.py's own error line, not accelerate's
# CalledProcessError traceback after it.
stage "3/4 train";             "$PY" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" --quiet \
                                 --num_cpu_threads_per_process "$THREADS" scripts/train.py "$@"
stage "4/4 evaluate";          "$PY" scripts/eval_mteb.py "$@"
echo; echo "pipeline finished in $(( $(date +%s) - start ))s"
