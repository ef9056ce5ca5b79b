"""The periodic push (job/syncrunner.py) without a bucket: a failed or crashed push is logged and tried again,
and stop() waits for the thread, also when a push stops it."""

from __future__ import annotations

import logging
import threading
import time

from job.errors import StorageError
from job.syncrunner import PeriodicRunner

INTERVAL_S = 0.01
WAIT_S = 5.0


def _stop_within(runner: PeriodicRunner, timeout_s: float) -> None:
    """runner.stop(), failing (not hanging) when it does not return within `timeout_s`."""
    stopper = threading.Thread(target=runner.stop, daemon=True)
    stopper.start()
    stopper.join(timeout_s)
    assert not stopper.is_alive(), "stop() did not return: the runner's thread still runs"


def test_failed_and_crashed_pushes_are_logged_and_tried_again(caplog) -> None:
    calls: list[int] = []
    third = threading.Event()

    def push() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise StorageError("Could not upload 1 of 1 file(s)")
        if len(calls) == 2:
            raise RuntimeError("a bug")
        third.set()

    runner = PeriodicRunner(push, INTERVAL_S, "gs://bucket/run/")
    with caplog.at_level(logging.WARNING, logger="job.syncrunner"):
        runner.start()
        runner.start()  # already running: no second thread
        assert third.wait(WAIT_S)
        _stop_within(runner, WAIT_S)
    count = len(calls)
    time.sleep(5 * INTERVAL_S)
    assert len(calls) == count  # stopped: no push after stop() returned
    assert "Periodic sync failed, will retry in 0 s: Could not upload 1 of 1 file(s)" in caplog.text
    assert "Periodic sync to gs://bucket/run/ crashed; will retry" in caplog.text
    assert runner._thread is not None and not runner._thread.is_alive()


def test_a_push_that_stops_the_runner_ends_its_thread() -> None:
    stopped = threading.Event()
    runner: PeriodicRunner

    def push() -> None:
        runner.stop()  # in the runner's own thread: must not join itself
        stopped.set()

    runner = PeriodicRunner(push, INTERVAL_S, "gs://bucket/run/")
    runner.start()
    assert stopped.wait(WAIT_S)
    _stop_within(runner, WAIT_S)
    assert runner._thread is not None and not runner._thread.is_alive()
