"""Two "machines" of one process each on this machine (`accelerate launch --num_machines 2
--machine_rank 0|1`, gloo): they train, checkpoint, are killed, resume from the last complete
checkpoint, and end with the weights of one process trained uninterrupted on the joined batch. run_dir is on a filesystem both see, as a
multi-node run needs (embed/training/checkpoints.py)."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import free_port
from tests.test_train import ENV, kill_tree, train_cmd, uninterrupted_reference, weights

pytestmark = pytest.mark.slow

STEPS = ["--train.max_steps", "6", "--train.save_steps", "1", "--train.stages.0.epochs", "2",
         "--train.precision", "fp32"]


def machines(model, data, run_dir, port):
    """Both machines' launchers."""
    procs = []
    for rank in (0, 1):
        launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                    "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                    "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no")
        procs.append(subprocess.Popen(train_cmd(model, data, run_dir, *STEPS, launcher=launcher), env=ENV,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def test_two_machines_train_checkpoint_and_resume(tmp_path, tiny_bert_dir):
    model, data, single = uninterrupted_reference(tiny_bert_dir, tmp_path, STEPS)

    run_dir = tmp_path / "two_machines"
    procs = machines(model, data, run_dir, free_port())
    try:
        deadline = time.time() + 400
        while time.time() < deadline and not list((run_dir / "checkpoints").glob("*/trainer_state.json")):
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
            time.sleep(0.01)
    finally:
        for p in procs:  # killed with one checkpoint complete, training (or saving) the next steps
            kill_tree(p)
    assert not (run_dir / "model").exists(), "the run finished before it could be killed"

    procs = machines(model, data, run_dir, free_port())
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "resuming from" in logs[0] and "x 2 process(es)" in logs[0]
    assert json.loads((run_dir / "train_summary.json").read_text())["steps"] == 6
    a, b = weights(run_dir), weights(single)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=5e-5, rtol=0, err_msg=key)
