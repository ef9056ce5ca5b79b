"""A stand-in for job.sync.OutputSync (the job's output syncer) that records the calls the job makes, and can
fail its final push; `use_fake_sync` makes a gs:// --output use it, with a local directory as the mirror."""

from __future__ import annotations

from pathlib import Path

import pytest

from job.errors import StorageError


class FakeSync:
    """Appends "push", "pull" and "final push" to `calls`; `close` raises `close_error` when one is given."""

    remote = "gs://bucket/run/"

    def __init__(self, calls: list[str] | None = None, close_error: StorageError | None = None) -> None:
        self.calls = [] if calls is None else calls
        self.close_error = close_error

    def acquire(self, job: str | None, take_over: bool = False) -> None:
        pass

    def release(self) -> None:
        pass

    def clear(self, rel_dir: str) -> int:
        return 0

    def push(self) -> None:
        self.calls.append("push")

    def pull(self) -> int:
        self.calls.append("pull")
        return 0

    def start(self) -> None:
        pass

    def close(self) -> None:
        if self.close_error is not None:
            raise self.close_error
        self.calls.append("final push")


def use_fake_sync(monkeypatch: pytest.MonkeyPatch, mirror: Path, syncer: FakeSync) -> None:
    """Make the job's open_output hand out `mirror` and `syncer` for any gs:// output."""
    from job import sync

    mirror.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(sync, "open_output", lambda output, root, interval, **_: (mirror, syncer))
