"""Files written so a crash never leaves a half file that looks whole: one atomic writer
(temp file in the same folder + rename) and an append-only JSONL writer for resumable jobs."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from embed.errors import DataError


# ---------------------------------------------------------------- low-level IO
def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; raise DataError on bad bytes or JSON."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w"):
    """Open a uniquely named temp file beside `path`; on success fsync and rename it over `path`.

    Readers see the old file or the new one, never half of one; two writers (ranks, reruns) never
    share a temp file; on an error the temp file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": "\n"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> None:
    """A matplotlib figure written atomically as PNG, then closed."""
    import matplotlib.pyplot as plt

    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", **savefig_kwargs)
    plt.close(fig)


def replace_dir_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """`write(tmp_dir)` then swap it in for `target`: a crash leaves the old folder or the new one."""
    target = Path(target)
    tmp, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


class JsonlAppender:
    """Append-only JSONL output that a rerun resumes: no duplicates, no gaps.

    On open, complete lines are read back and their keys collected in `done`; a torn last
    line (the process was killed mid-write) is cut off. `write` flushes and fsyncs, so
    whatever `done` reports after a crash really is on disk.
    """

    def __init__(self, path: str | os.PathLike, key_fn: Callable[[dict], Any]):
        self.path = Path(path)
        self.key_fn = key_fn
        self.done: set = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_and_index()
        self._file = open(self.path, "a", encoding="utf-8")

    def _repair_and_index(self) -> None:
        if not self.path.exists():
            return
        good_bytes = 0
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # torn tail
                try:
                    row = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    break  # torn or corrupt tail: keep what precedes it
                self.done.add(self.key_fn(row))
                good_bytes += len(raw)
        if good_bytes != self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)

    def write(self, rows: Iterable[dict]) -> int:
        n = 0
        for row in rows:
            key = self.key_fn(row)
            if key in self.done:
                continue
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.done.add(key)
            n += 1
        self._file.flush()
        os.fsync(self._file.fileno())
        return n

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
