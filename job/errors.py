"""User-facing errors: one sentence naming the input and the fix, and an exit code."""

from __future__ import annotations


class JobError(Exception):
    """A problem with the user's input or environment; the CLI prints it and exits non-zero."""

    exit_code = 2


class StorageError(JobError):
    """Object storage could not be read or written (after retries)."""

    exit_code = 3
