"""The vLLM backend's calls against the real vLLM API (bench/check_vllm_api.py), run with the
interpreter of vLLM's own environment (vLLM pins its own torch): $EMBED_VLLM_PYTHON, by default
/opt/vllm-venv/bin/python. No GPU needed; skipped where that interpreter or vllm is absent."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("EMBED_VLLM_PYTHON", "/opt/vllm-venv/bin/python")
NOT_INSTALLED = 3  # the script's exit status when vllm is not importable


@pytest.mark.slow
def test_backend_calls_match_the_real_vllm_api():
    if not os.access(VLLM_PYTHON, os.X_OK):
        pytest.skip(f"no vLLM environment at {VLLM_PYTHON} (set EMBED_VLLM_PYTHON; see bench/README.md)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run([VLLM_PYTHON, str(REPO / "bench" / "check_vllm_api.py")], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail("bench/check_vllm_api.py ran over 600 s")
    if proc.returncode == NOT_INSTALLED:
        pytest.skip(f"vllm is not installed for {VLLM_PYTHON}")
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"check_vllm_api.py exited {proc.returncode} without its JSON report:\n{proc.stderr[-3000:]}")
    failed = {name: result for name, result in report["checks"].items() if result != "ok"}
    assert not failed, f"vLLM {report['vllm']}: our calls do not match its API:\n{json.dumps(failed, indent=1)}"
    assert proc.returncode == 0 and report["ok"], proc.stderr[-3000:]
