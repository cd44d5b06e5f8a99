#!/usr/bin/env bash
# The GPU performance check (issue 8): bench/gpu_check.py's parts (a)-(e), one command, no network.
#
#   bash bench/gpu_check.sh            # on a GPU machine: a 6-minute budget (est. 3-5 min on one H100)
#   bash bench/gpu_check.sh --dry      # toy sizes on CPU in about a minute: proves the script works
#   OUT=/some/dir bash bench/gpu_check.sh --parts ad    # more options: python bench/gpu_check.py --help
#
# Writes $OUT/gpu_check.json and $OUT/gpu_check.log; OUT defaults to ./gpu_check_out.
set -euo pipefail
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_check.py --out "$OUT" "$@"
