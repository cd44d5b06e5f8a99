"""Checkpoints that make a killed run resume exactly.

`accelerator.save_state` stores model, optimizer, scheduler and every process's RNG state;
we add `trainer_state.json` (stage, step, loss history, the settings that shape the run) and
write it LAST, atomically, so a folder without it is an interrupted save and is ignored (and later
removed). A checkpoint written under other settings (a changed recipe, re-mined data) is refused:
resuming it would silently mix two runs.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from embed.config import ConfigError
from embed.data import write_json_atomic

STATE_FILE = "trainer_state.json"


@dataclass
class Resume:
    path: Path
    stage: int
    step_in_stage: int
    global_step: int
    losses: list[float]


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
        done = self._complete()
        if not done:
            return None
        state = json.loads((done[-1] / STATE_FILE).read_text())
        stored = state.get("settings", self.settings)
        if stored != self.settings:
            changed = sorted(k for k in stored.keys() | self.settings.keys() if stored.get(k) != self.settings.get(k))
            raise ConfigError(f"{done[-1]} was written with other settings ({', '.join(changed[:6])}"
                              f"{', ...' if len(changed) > 6 else ''} changed): resuming would mix two runs; "
                              f"remove {self.root} to start over, or use another run_dir")
        return Resume(done[-1], state["stage"], state["step_in_stage"], state["global_step"], state["losses"])

    def save(self, stage: int, step_in_stage: int, global_step: int, losses: list[float]) -> Path:
        path = self.root / f"step_{global_step:07d}"
        if self.accelerator.is_main_process and path.exists():
            shutil.rmtree(path)  # a torn save of the same step from a killed run
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(path), safe_serialization=True)
        if self.accelerator.is_main_process:
            write_json_atomic(path / STATE_FILE, {"stage": stage, "step_in_stage": step_in_stage,
                                                  "global_step": global_step, "losses": losses,
                                                  "settings": self.settings})
            self._prune()
        self.accelerator.wait_for_everyone()
        return path

    def load(self, resume: Resume) -> None:
        self.accelerator.load_state(str(resume.path))

    def _prune(self) -> None:
        complete = self._complete()
        for old in complete[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for p in self.root.iterdir():  # interrupted saves
            if p.is_dir() and not (p / STATE_FILE).is_file():
                shutil.rmtree(p, ignore_errors=True)
