"""embed.training.checkpoints without a process group: the completion marker is written only after
every rank saved, a failed RNG restore stops the resume, other settings are refused by key name."""
import json
import os

import pytest
import torch

from embed.errors import ConfigError, DataError
from embed.training.checkpoints import STATE_FILE, CheckpointManager
from embed.training.stages import flatten


class RecordingAccelerator:
    """The part of accelerate.Accelerator that CheckpointManager calls, recording the order."""

    def __init__(self, process_index=0, rng_restored=True):
        self.calls, self.process_index, self.rng_restored = [], process_index, rng_restored
        self.is_main_process = process_index == 0
        self.num_processes, self.device = 1, torch.device("cpu")

    def wait_for_everyone(self):
        self.calls.append("barrier")

    def save_state(self, path, safe_serialization=True):
        self.calls.append("save_state")
        os.makedirs(path, exist_ok=True)
        torch.save({"torch_manual_seed": torch.get_rng_state()}, f"{path}/random_states_{self.process_index}.pkl")

    def load_state(self, path):
        self.calls.append("load_state")
        if self.rng_restored:
            torch.set_rng_state(torch.load(f"{path}/random_states_{self.process_index}.pkl")["torch_manual_seed"])


def test_marker_is_written_after_a_barrier_that_follows_every_ranks_save(tmp_path, monkeypatch):
    acc = RecordingAccelerator()
    manager = CheckpointManager(tmp_path / "ckpt", acc)
    import embed.training.checkpoints as checkpoints

    real_write = checkpoints.write_json_atomic
    monkeypatch.setattr(checkpoints, "write_json_atomic", lambda *a: (acc.calls.append("marker"), real_write(*a)))
    path = manager.save(stage=0, step_in_stage=1, global_step=1, losses=[1.0])
    assert acc.calls == ["barrier", "save_state", "barrier", "marker", "barrier"]
    assert (path / STATE_FILE).is_file()


def test_a_random_state_that_was_not_restored_stops_the_resume(tmp_path):
    acc = RecordingAccelerator(rng_restored=False)
    manager = CheckpointManager(tmp_path / "ckpt", acc)
    manager.save(stage=0, step_in_stage=1, global_step=1, losses=[1.0])
    torch.manual_seed(12345)  # anything but the saved state
    with pytest.raises(DataError, match="random_states_0.pkl: accelerate could not restore"):
        manager.load(manager.latest())
    CheckpointManager(tmp_path / "ckpt", RecordingAccelerator()).load(manager.latest())  # restored: fine


def test_a_missing_random_state_file_is_named(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", RecordingAccelerator())
    resume_path = manager.save(stage=0, step_in_stage=1, global_step=1, losses=[1.0])
    (resume_path / "random_states_0.pkl").unlink()
    with pytest.raises(DataError, match="random_states_0.pkl: missing"):
        manager.load(manager.latest())


def test_checkpoint_of_other_settings_is_refused_naming_the_key(tmp_path):
    settings = flatten({"train": {"max_steps": 3, "stages": [{"learning_rate": 1e-3}]}})
    assert settings == {"train.max_steps": 3, "train.stages.0.learning_rate": 1e-3}
    CheckpointManager(tmp_path / "ckpt", RecordingAccelerator(), settings=settings).save(0, 1, 1, [1.0])
    other = dict(settings, **{"train.max_steps": 2})
    with pytest.raises(ConfigError, match=r"\(train.max_steps changed\)"):
        CheckpointManager(tmp_path / "ckpt", RecordingAccelerator(), settings=other).latest()
    state = json.loads(next((tmp_path / "ckpt").glob(f"*/{STATE_FILE}")).read_text())
    assert state["global_step"] == 1
    assert CheckpointManager(tmp_path / "ckpt", RecordingAccelerator(), settings=settings).latest().global_step == 1
