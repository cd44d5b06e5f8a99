"""A 2-process run killed while one rank is still writing its part of a checkpoint: the main
process must not have marked that checkpoint complete (a barrier comes first), and the rerun
resumes from the one before and ends with the weights of an uninterrupted run.

Rank 1's slowness is injected from outside the code under test: a sitecustomize module, written
to a temporary folder put on PYTHONPATH, wraps accelerate's save_state so that rank 1 stalls
after its second save_state (as a rank with a slow disk would)."""
import json
import subprocess
import time

import numpy as np
import pytest

from tests.conftest import ddp_launcher
from tests.test_train import (
    ENV,
    kill_tree,
    train_cmd,
    uninterrupted_reference,
    weights,
)

pytestmark = pytest.mark.slow

STEPS = ["--train.max_steps", "4", "--train.save_steps", "1", "--train.stages.0.epochs", "2",
         "--train.precision", "fp32"]
SLOW_RANK = '''
import os
if os.environ.get("SLOW_RANK_SIGNAL"):
    import time
    import accelerate

    _save_state, _calls = accelerate.Accelerator.save_state, []

    def save_state(self, *args, **kwargs):
        out = _save_state(self, *args, **kwargs)
        _calls.append(1)
        if len(_calls) == 2 and self.process_index == 1:
            open(os.environ["SLOW_RANK_SIGNAL"], "w").close()
            time.sleep(120)
        return out

    accelerate.Accelerator.save_state = save_state
'''


def test_kill_while_a_rank_still_saves_resumes_exactly(tmp_path, tiny_bert_dir):
    model, data, single = uninterrupted_reference(tiny_bert_dir, tmp_path, STEPS)

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_RANK)
    signal_file = tmp_path / "rank1_stalled"
    run_dir = tmp_path / "ddp"
    env = {**ENV, "PYTHONPATH": f"{hook}:{ENV['PYTHONPATH']}", "SLOW_RANK_SIGNAL": str(signal_file)}
    launcher = ddp_launcher()
    proc = subprocess.Popen(train_cmd(model, data, run_dir, *STEPS, launcher=launcher), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and not signal_file.exists():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        time.sleep(3)  # ample time for the main process to write a marker if nothing held it
        second = run_dir / "checkpoints" / "step_0000002"
        assert (second / "model.safetensors").is_file(), "rank 0 has written its part"
        assert not (second / "trainer_state.json").exists(), "marked complete while rank 1 was still saving"
    finally:
        kill_tree(proc)

    out = subprocess.run(train_cmd(model, data, run_dir, *STEPS, launcher=launcher), env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from" in out.stdout and "step_0000001" in out.stdout
    assert json.loads((run_dir / "train_summary.json").read_text())["steps"] == 4
    a, b = weights(run_dir), weights(single)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=5e-5, rtol=0, err_msg=key)
