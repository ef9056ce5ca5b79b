"""User-facing errors: one sentence naming the input and the fix, and an exit code."""

from __future__ import annotations

import errno


class JobError(Exception):
    """A problem with the user's input or environment; the CLI prints it and exits non-zero."""

    exit_code = 2


class StorageError(JobError):
    """Object storage could not be read or written (after retries)."""

    exit_code = 3


class DiskFullError(JobError):
    """The disk (or quota) filled up while writing; what was written before is intact, a rerun resumes."""

    exit_code = 4


class ClusterError(JobError):
    """Another worker of a multi-worker job failed, or did not reach a barrier in time."""

    exit_code = 5


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
UNWRITABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR})
# What TensorFlow's file system layer says for the same faults (its errors carry no errno).
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")
UNWRITABLE_TEXTS = ("Read-only file system", "Permission denied", "Not a directory")


def from_os_error(err: BaseException) -> JobError | None:
    """A full disk or an unwritable path met while writing, as a one-line JobError; None for anything else."""
    if not isinstance(err, OSError) and not type(err).__module__.startswith("tensorflow"):
        return None
    number = err.errno if isinstance(err, OSError) else None
    text = str(err)
    where = getattr(err, "filename", None) or "the output or data.cache_dir"
    if number in DISK_FULL_ERRNOS or any(t in text for t in DISK_FULL_TEXTS):
        return DiskFullError(
            f"no space left on the device while writing {where}: free space there (or pass another --output / "
            "data.cache_dir), then rerun the same command to resume."
        )
    if number in UNWRITABLE_ERRNOS or (number is None and any(t in text for t in UNWRITABLE_TEXTS)):
        reason = err.strerror if isinstance(err, OSError) and err.strerror else text.splitlines()[0]
        return JobError(f"cannot use {where} ({reason}): fix its permissions (or remount it writable), or pass "
                        "another --output / data.cache_dir.")
    return None
