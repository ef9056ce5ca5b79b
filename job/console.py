"""The terminal: the job's log lines (and only its own), TensorFlow's held back, a progress bar per epoch.

TensorFlow writes C++ lines to stderr before its log level applies (oneDNN and CUDA notices, `failed call to
cuInit` on a machine without a GPU); `import_tensorflow` holds those back and `configure` sets its C++ log
level, so a run shows the job's lines only unless `--log-level debug` asks for TensorFlow's too.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"
TF_LOG_ENV = "TF_CPP_MIN_LOG_LEVEL"
TF_QUIET, TF_VERBOSE = "3", "0"  # TensorFlow's C++ levels: 3 hides INFO, WARNING and ERROR lines; 0 shows all
# The user's own TF_CPP_MIN_LOG_LEVEL, read before this module sets it: an explicit choice wins.
_USER_TF_LEVEL = os.environ.get(TF_LOG_ENV)
# Python loggers of libraries: warnings only, unless --log-level debug (TensorFlow's "Assets written to ...").
LIBRARY_LOGGERS = ("tensorflow", "absl", "h5py", "matplotlib", "PIL")
BAR_WIDTH = 24  # characters of the bar itself
REDRAW_S = 0.1  # a bar is redrawn at most this often (and at its last step)
CLEAR_LINE = "\r\x1b[2K"

_bar: ProgressBar | None = None  # the bar on screen, which log lines clear and redraw


class _Handler(logging.StreamHandler):
    """Log records to the current sys.stderr, clearing the progress bar on screen first and redrawing it after."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the current sys.stderr is used instead
        pass

    def emit(self, record: logging.LogRecord) -> None:
        bar = _bar
        if bar is not None:
            bar.clear()
        super().emit(record)
        if bar is not None:
            bar.draw()


def configure(level: str) -> None:
    """Log the job's records at `level` and up on stderr; TensorFlow's own lines only with DEBUG."""
    root = logging.getLogger()
    if not any(isinstance(h, _Handler) for h in root.handlers):
        handler = _Handler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
        root.addHandler(handler)
    root.setLevel(level.upper())
    debug = root.level <= logging.DEBUG
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
    if _USER_TF_LEVEL is None:  # read by TensorFlow when it loads, and for each C++ log line
        os.environ[TF_LOG_ENV] = TF_VERBOSE if debug else TF_QUIET


def import_tensorflow() -> None:
    """Import TensorFlow with what its libraries print while loading (before any log level applies) held back:
    shown with --log-level debug, or when the import fails."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    with tempfile.TemporaryFile() as held:
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        failed = True
        try:
            import tensorflow  # noqa: F401

            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode(errors="replace")
            if text and (failed or logging.getLogger().isEnabledFor(logging.DEBUG)):
                sys.stderr.write(text)
                sys.stderr.flush()


def count(number: int, noun: str, plural: str | None = None) -> str:
    """'1 epoch', '3 epochs' ('1 replica', '2 replicas'); `plural` for irregular nouns."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def share(fraction: float) -> str:
    """A label fraction in words: 1.0 → '100%', 0.02 → '2%'."""
    return f"{100 * fraction:g}%"


class ProgressBar:
    """One epoch's progress on a terminal, redrawn in place: `epoch 3/8 [=====>      ] 7/14  loss=0.012`."""

    def __init__(self, title: str, total: int, done: int = 0):
        self.title, self.total, self.done = title, max(total, 1), done
        self.text = ""
        self._drawn_at = 0.0
        self._start: float | None = None  # the rate is timed from the first step done (the first may trace)
        self._start_done = done

    def update(self, done: int, values: dict[str, float]) -> None:
        if self._start is None:
            self._start, self._start_done = time.perf_counter(), done
        self.done = done
        self.text = "  ".join(f"{name}={value:.4g}" for name, value in values.items())
        now = time.perf_counter()
        if now - self._drawn_at >= REDRAW_S or done >= self.total:
            self.draw()
            self._drawn_at = now

    def line(self) -> str:
        filled = BAR_WIDTH * min(self.done, self.total) // self.total
        arrow = ">" if filled < BAR_WIDTH else ""
        bar = "=" * filled + arrow + " " * (BAR_WIDTH - filled - len(arrow))
        steps = self.done - self._start_done
        eta = ""
        if steps and self._start is not None and self.done < self.total:
            rate = steps / max(time.perf_counter() - self._start, 1e-9)
            eta = f"  ETA {(self.total - self.done) / rate:.0f} s"
        line = f"{self.title} [{bar}] {self.done}/{self.total}{eta}  {self.text}".rstrip()
        width = _terminal_columns()
        return line[: width - 1] if width else line

    def draw(self) -> None:
        sys.stderr.write(CLEAR_LINE + self.line())
        sys.stderr.flush()

    def clear(self) -> None:
        sys.stderr.write(CLEAR_LINE)
        sys.stderr.flush()

    def close(self) -> None:
        """Take the bar off the screen (the epoch's log line follows)."""
        global _bar
        if _bar is self:
            _bar = None
        self.clear()


def progress_bar(title: str, total: int, done: int = 0) -> ProgressBar | None:
    """A bar for one epoch when stderr is a terminal and INFO lines are shown; None otherwise (log lines then)."""
    global _bar
    stream = sys.stderr
    if not logging.getLogger().isEnabledFor(logging.INFO) or not (hasattr(stream, "isatty") and stream.isatty()):
        return None
    if _bar is not None:
        _bar.close()
    _bar = ProgressBar(title, total, done)
    _bar.draw()
    return _bar


def close_progress() -> None:
    """Take the bar on screen, if any, off it."""
    if _bar is not None:
        _bar.close()


def _terminal_columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0
