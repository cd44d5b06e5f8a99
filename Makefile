# mteb-domain-embeddings: the commands the README documents.
PY ?= python
RUNS ?= runs
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# PyTorch's OpenMP threads busy-wait by default; on a shared or small CPU that wastes most of the
# time (measured here: a SmolLM2 decode step 1 s -> 0.1 s). Must be set before torch is imported.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install test test-fast demo bench style gpu-check clean

install:  ## core deps (CPU), the embedded defaults, and `embed` importable everywhere
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .

test:  ## the full CPU suite (what CI runs); ~10 min on 2 cores
	$(PY) -m pytest -q

test-fast:  ## skip the multi-process and real-data tests
	$(PY) -m pytest -q -m "not slow"

demo: install  ## the whole pipeline offline on CPU on the built-in stdlib code-search domain (<= 20 min)
	bash scripts/pipeline.sh recipes/demo-stdlib-cpu.yaml

bench:  ## CPU benchmarks; each prints JSON (see bench/README.md)
	$(PY) bench/bench_train.py
	$(PY) bench/bench_mine.py
	$(PY) bench/bench_gen.py
	$(PY) bench/bench_gradcache.py

gpu-check:  ## on a GPU machine: throughput, MFU, fp16/bf16/decoder/ZeRO paths -> $$OUT
	bash bench/gpu_check.sh

style:  ## byte-compile everything (syntax) and run ruff when installed
	$(PY) -m compileall -q embed scripts bench tests
	@if $(PY) -m ruff --version >/dev/null 2>&1; then $(PY) -m ruff check embed scripts bench tests; else echo "ruff not installed: skipped"; fi

clean:
	rm -rf $(RUNS) .pytest_cache
