"""Progress of a transfer: a tqdm bar on a terminal, else a log line every ~10% or 30 s. No TensorFlow here."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

PROGRESS_LOG_FRACTION = 0.10
PROGRESS_LOG_INTERVAL_S = 30.0


class TransferProgress:
    """A tqdm bar on a TTY; otherwise a log line every ~10% or 30 s. Thread-safe; counts bytes and files."""

    def __init__(self, total_bytes: int | None, desc: str, total_files: int | None = None) -> None:
        self._total = total_bytes
        self._total_files = total_files
        self._desc = desc
        self._done = 0
        self._files = 0
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last_log = self._start
        self._next_fraction = PROGRESS_LOG_FRACTION
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, leave=False)

    def update(self, n: int) -> None:
        """Account for `n` more bytes."""
        with self._lock:
            self._done += n
            if self._bar is not None:
                self._bar.update(n)
            else:
                self._maybe_log()

    def file_done(self) -> None:
        """Account for one more finished file."""
        with self._lock:
            self._files += 1
            if self._bar is None:
                self._maybe_log()

    def _fraction(self) -> float:
        if self._total:
            return self._done / self._total
        return self._files / self._total_files if self._total_files else 0.0

    def _maybe_log(self) -> None:
        now = time.monotonic()
        fraction = self._fraction()
        if fraction < self._next_fraction and now - self._last_log < PROGRESS_LOG_INTERVAL_S:
            return
        while self._next_fraction <= fraction:
            self._next_fraction += PROGRESS_LOG_FRACTION
        self._last_log = now
        logger.info("%s: %s (%.0f%%)", self._desc, self._summary(), 100 * fraction)

    def _summary(self) -> str:
        total = f"/{self._total / 1e6:.1f}" if self._total else ""
        text = f"{self._done / 1e6:.1f}{total} MB"
        if self._total_files:
            text = f"{self._files}/{self._total_files} files, {text}"
        return text

    def close(self) -> None:
        """Finish the bar / log a summary."""
        if self._bar is not None:
            self._bar.close()
        logger.info("%s: %s in %.1f s", self._desc, self._summary(), time.monotonic() - self._start)


class CountingWriter:
    """File wrapper that reports written bytes to a TransferProgress."""

    def __init__(self, fh: BinaryIO, progress: TransferProgress) -> None:
        self._fh = fh
        self._progress = progress

    def write(self, data: bytes) -> int:
        written = self._fh.write(data)
        self._progress.update(len(data))
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)
