"""Checkpoints that make a killed run resume exactly.

`accelerator.save_state` stores model, optimizer, scheduler and every process's RNG state;
we add `trainer_state.json` (stage, step, loss history, the settings that shape the run) and
write it LAST: after a barrier (every rank has written its part), by the main process,
atomically. A folder without it is an interrupted save and is ignored (and later removed).
A checkpoint written under other settings (a changed recipe, re-mined data) is refused:
resuming it would silently mix two runs. scripts/train.py applies the same check
(`settings_mismatch`) to a finished model, whose settings train_summary.json keeps.

Multi-node: every rank must see the same checkpoints (run_dir on a shared filesystem);
accelerate writes the weights and optimizer from the main process and each rank's RNG state
from that rank, so without a shared filesystem no node holds a whole checkpoint. `latest()`
checks that every rank sees the same one and stops with a one-line error otherwise.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from embed.errors import ConfigError, DataError
from embed.io import write_json_atomic

STATE_FILE = "trainer_state.json"
RNG_FILE = "random_states_{}.pkl"  # accelerate's name for process i's RNG state


@dataclass
class Resume:
    path: Path
    stage: int
    step_in_stage: int
    global_step: int
    losses: list[float]


def settings_mismatch(what: str, stored: dict, current: dict, remedy: str) -> ConfigError | None:
    """A one-line error naming the keys whose value differs between `stored` and `current`, or None."""
    current = json.loads(json.dumps(current))  # as it reads back from JSON
    if stored == current:
        return None
    changed = sorted(k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k))
    return ConfigError(f"{what} was written with other settings ({', '.join(changed[:6])}"
                       f"{', ...' if len(changed) > 6 else ''} changed): {remedy}")


class CheckpointManager:
    def __init__(self, root: Path, accelerator, keep: int = 2, settings: dict | None = None):
        self.root, self.accelerator, self.keep = Path(root), accelerator, max(keep, 1)
        self.settings = json.loads(json.dumps(settings or {}))  # as it reads back from JSON

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.iterdir() if (p / STATE_FILE).is_file()]
        return sorted(done, key=lambda p: json.loads((p / STATE_FILE).read_text())["global_step"])

    def latest(self) -> Resume | None:
        """The newest complete checkpoint, the same on every rank, written under these settings."""
        done = self._complete()
        state = json.loads((done[-1] / STATE_FILE).read_text()) if done else None
        step = torch.tensor([state["global_step"] if state else -1], device=self.accelerator.device)
        if self.accelerator.num_processes > 1 and len(set(self.accelerator.gather(step).tolist())) > 1:
            raise ConfigError(f"the ranks see different checkpoints in {self.root}: every node needs run_dir "
                              f"on a shared filesystem")
        if state is None:
            return None
        error = settings_mismatch(str(done[-1]), state.get("settings", self.settings), self.settings,
                                  f"resuming would mix two runs; remove {self.root} to start over, or use another run_dir")
        if error:
            raise error
        return Resume(done[-1], state["stage"], state["step_in_stage"], state["global_step"], state["losses"])

    def save(self, stage: int, step_in_stage: int, global_step: int, losses: list[float]) -> Path:
        path = self.root / f"step_{global_step:07d}"
        if self.accelerator.is_main_process and path.exists():
            shutil.rmtree(path)  # a torn save of the same step from a killed run
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(path), safe_serialization=True)
        self.accelerator.wait_for_everyone()  # every rank has written its part before the marker
        if self.accelerator.is_main_process:
            write_json_atomic(path / STATE_FILE, {"stage": stage, "step_in_stage": step_in_stage,
                                                  "global_step": global_step, "losses": losses,
                                                  "settings": self.settings})
            self._prune()
        self.accelerator.wait_for_everyone()
        return path

    def load(self, resume: Resume) -> None:
        """accelerate's load_state, then a check that this process's RNG state was restored:
        accelerate reports a failure to load it at info level only, and a resume without it
        draws other dropout masks than the uninterrupted run."""
        from accelerate.utils import load

        rng_file = resume.path / RNG_FILE.format(self.accelerator.process_index)
        if not rng_file.is_file():
            raise DataError(f"{rng_file}: missing; this checkpoint cannot resume process "
                            f"{self.accelerator.process_index} exactly (remove {resume.path} to resume the one before)")
        self.accelerator.load_state(str(resume.path))
        saved = load(str(rng_file), map_location="cpu")["torch_manual_seed"]
        if not torch.equal(torch.get_rng_state(), saved):
            raise DataError(f"{rng_file}: accelerate could not restore this random state; a resume would not "
                            f"be exact (remove {resume.path} to resume the one before)")

    def remove_all(self) -> None:
        """Drop every checkpoint (main process): the finished model makes them redundant."""
        if self.accelerator.is_main_process:
            shutil.rmtree(self.root, ignore_errors=True)

    def _prune(self) -> None:
        complete = self._complete()
        for old in complete[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for p in self.root.iterdir():  # interrupted saves
            if p.is_dir() and not (p / STATE_FILE).is_file():
                shutil.rmtree(p, ignore_errors=True)
