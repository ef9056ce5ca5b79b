"""Tests for job.console: a progress bar only on a terminal, log lines that clear and redraw it, counted words."""

from __future__ import annotations

import io
import logging

import pytest

from job import console


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def terminal(monkeypatch: pytest.MonkeyPatch) -> Terminal:
    """stderr as a terminal, set in the test itself (pytest's capture swaps sys.stderr after fixtures)."""
    stream = Terminal()
    monkeypatch.setattr("sys.stderr", stream)
    console.configure("INFO")
    return stream


@pytest.fixture(autouse=True)
def _no_bar_left() -> None:
    yield
    console.close_progress()


def test_a_bar_on_a_terminal_and_log_lines_that_clear_and_redraw_it(monkeypatch):
    stderr = terminal(monkeypatch)
    monkeypatch.setattr(console, "REDRAW_S", 0.0)
    bar = console.progress_bar("epoch 1/3", 4)
    assert bar is not None
    bar.update(2, {"loss": 0.5})
    logging.getLogger("job.test").info("a line in the middle")
    bar.update(3, {"loss": 0.3})
    bar.update(4, {"loss": 0.25})
    console.close_progress()
    screen = stderr.getvalue()
    # No ETA from the first step (it may have traced the model), then one from the steps after it.
    assert "epoch 1/3 [============>           ] 2/4  loss=0.5" in screen
    before, _, after = screen.partition("a line in the middle\n")
    assert before.endswith(console.CLEAR_LINE + _log_prefix(before))  # the bar was cleared for the line
    assert after.startswith(console.CLEAR_LINE + "epoch 1/3 [")  # and redrawn under it
    assert "] 3/4  ETA 0 s  loss=0.3" in after
    assert "[========================] 4/4  loss=0.25" in after
    assert screen.endswith(console.CLEAR_LINE)  # closed: the screen is left to what follows


def _log_prefix(text: str) -> str:
    return text[text.rindex(console.CLEAR_LINE) + len(console.CLEAR_LINE):]


def test_no_bar_when_stderr_is_not_a_terminal_or_info_is_off(monkeypatch):
    stderr = terminal(monkeypatch)
    monkeypatch.setattr(stderr, "isatty", lambda: False)
    assert console.progress_bar("epoch 1/3", 4) is None
    monkeypatch.setattr(stderr, "isatty", lambda: True)
    console.configure("WARNING")
    assert console.progress_bar("epoch 1/3", 4) is None
    assert stderr.getvalue() == ""


def test_counts_and_shares_in_words():
    assert console.count(1, "epoch") == "1 epoch" and console.count(3, "epoch") == "3 epochs"
    assert console.count(1, "replica") == "1 replica" and console.count(0, "seed") == "0 seeds"
    assert console.share(1.0) == "100%" and console.share(0.02) == "2%" and console.share(0.1) == "10%"
