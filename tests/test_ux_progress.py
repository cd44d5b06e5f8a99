"""Progress off a terminal: plain lines instead of bars (a log file keeps every redraw of a bar)."""
from __future__ import annotations

import io

import pytest

from embed import runtime
from embed.runtime import (
    LineProgress,
    on_terminal,
    progress_bar,
    quiet_progress_off_terminal,
)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_line_progress_logs_plain_lines_at_most_every_interval():
    lines = []
    with LineProgress(total=4, desc="gen", log=lines.append, initial=1, unit="doc", interval=3600) as bar:
        bar.update(1)  # within the interval: no line
        bar.set_postfix(queries_per_s="1.50")
        bar.update(2)  # done: always a line
    assert lines == ["gen: 4/4 doc (queries_per_s=1.50)"]
    every = []
    bar = LineProgress(total=3, desc="mine", log=every.append, interval=0)
    bar.update()
    bar.update()
    assert every == ["mine: 1/3 it", "mine: 2/3 it"]
    assert not any("\r" in line or "\x1b" in line for line in lines + every)


def test_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(runtime.sys, "stderr", io.StringIO())  # a log file
    assert not on_terminal()
    assert isinstance(progress_bar(10, "gen", print), LineProgress)
    monkeypatch.setattr(runtime.sys, "stderr", Terminal())
    assert on_terminal()
    bar = progress_bar(10, "gen", print)
    assert not isinstance(bar, LineProgress)
    bar.close()
    monkeypatch.setenv("TQDM_DISABLE", "1")  # what pipeline.sh sets off a terminal
    assert not on_terminal()


def test_library_bars_are_turned_off_off_a_terminal(monkeypatch):
    transformers_logging = pytest.importorskip("transformers.utils.logging")
    import huggingface_hub.utils

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(runtime.sys, "stderr", io.StringIO())
    try:
        assert quiet_progress_off_terminal() is False
        assert not transformers_logging.is_progress_bar_enabled()
        assert huggingface_hub.utils.are_progress_bars_disabled()
    finally:  # leave the process as other tests expect it
        transformers_logging.enable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()
