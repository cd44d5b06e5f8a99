"""pipeline.sh as a user meets it: a mistake is one line before anything runs; the launch is quiet.

The stage scripts are replaced by a recording `PYTHON` wrapper (the pipeline's own hook for the
interpreter), so these tests check the pipeline's logic in seconds; the stages are tested elsewhere.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Records every call; stage scripts succeed at once; `accelerate launch` really runs, on a stub train.py.
WRAPPER = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
echo "TQDM_DISABLE=${{TQDM_DISABLE:-}}" >> "$CALLS.env"
case "$*" in
  *scripts/gen_vllm.py*|*scripts/mine_faiss.py*|*scripts/eval_mteb.py*) exit 0 ;;
esac
args=()
for a in "$@"; do [[ "$a" == scripts/train.py ]] && a="$STUB_TRAIN"; args+=("$a"); done
exec {python} "${{args[@]}}"
"""


@pytest.fixture
def pipeline(tmp_path):
    wrapper = tmp_path / "python"
    wrapper.write_text(WRAPPER.format(python=sys.executable))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "train_stub.py"

    def run(*args, train_exit: int = 0):
        stub.write_text("import sys\n"
                        f"print('error: stub train failed', file=sys.stderr) if {train_exit} else print('stub train ran')\n"
                        f"sys.exit({train_exit})\n")
        env = {**os.environ, "PYTHON": str(wrapper), "CALLS": str(calls), "STUB_TRAIN": str(stub)}
        for name in ("NUM_CPU_THREADS_PER_PROCESS", "TQDM_DISABLE"):
            env.pop(name, None)
        done = subprocess.run(["bash", str(REPO / "scripts" / "pipeline.sh"), *args], env=env,
                              capture_output=True, text=True, timeout=300)
        return done, calls.read_text().splitlines() if calls.exists() else []

    return run


def recipe(tmp_path) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\n")
    return str(path)


@pytest.mark.parametrize("bad", [["--train.learning_rate", "1e-5"], ["--data.corpus", "/nonexistent/corpus"],
                                 ["--train.stages.3.learning_rate", "1e-5"]])
def test_a_mistake_is_one_error_line_before_any_stage_runs(pipeline, tmp_path, bad):
    done, calls = pipeline(recipe(tmp_path), *bad)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "CalledProcessError" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), done.stderr
    assert not any(c.startswith(("scripts/", "-m accelerate")) for c in calls)  # nothing launched
    assert not (tmp_path / "run").exists()


def test_the_launch_passes_the_thread_count_and_accelerate_does_not_warn(pipeline, tmp_path):
    done, calls = pipeline(recipe(tmp_path))
    assert done.returncode == 0, done.stderr
    launch = next(c for c in calls if "accelerate.commands.launch" in c).split()
    threads = launch[launch.index("--num_cpu_threads_per_process") + 1]
    assert int(threads) >= 1
    assert "stub train ran" in done.stdout  # accelerate really launched the (stub) training script
    assert "num_cpu_threads_per_process" not in done.stderr and "were not passed" not in done.stderr
    assert [c.split()[0] for c in calls if c.startswith("scripts/")] == [
        "scripts/gen_vllm.py", "scripts/mine_faiss.py", "scripts/eval_mteb.py"]
    # run with output to a pipe (as into a log file): every stage sees tqdm's bars turned off
    assert set(Path(str(tmp_path / "calls.txt") + ".env").read_text().split()) == {"TQDM_DISABLE=1"}


def test_a_failed_training_run_ends_without_accelerates_traceback(pipeline, tmp_path):
    done, _ = pipeline(recipe(tmp_path), train_exit=2)
    assert done.returncode != 0
    assert "error: stub train failed" in done.stderr
    assert "Traceback" not in done.stderr and "CalledProcessError" not in done.stderr
