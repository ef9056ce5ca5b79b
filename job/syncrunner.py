"""The periodic push: a daemon thread that calls a push every interval, logging a failed one and trying again at
the next interval, until it is stopped (job/sync.py stops it before the final push)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from job.errors import JobError

__all__ = ["PeriodicRunner"]

logger = logging.getLogger(__name__)

THREAD_NAME = "output-sync"


class PeriodicRunner:
    """Calls `push` every `interval_s` seconds on a daemon thread; `remote` names the output in its warnings."""

    def __init__(self, push: Callable[[], object], interval_s: float, remote: str) -> None:
        self._push = push
        self.interval_s = interval_s
        self._remote = remote
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (if it is not running)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, letting an in-flight push finish (unless called from that thread)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._push()
            except JobError as exc:  # StorageError, or LeaseLost: another job took the output over
                logger.warning("Periodic sync failed, will retry in %.0f s: %s", self.interval_s, exc)
            except Exception:
                logger.exception("Periodic sync to %s crashed; will retry", self._remote)
