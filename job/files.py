"""Files the job writes, made whole or not at all, and JSON records read back with a fix when they are torn.

Every artifact is written under a temporary name in its own directory and renamed into place, so that a
signal's `sys.exit` (or a crash) mid-write leaves the previous version, never a truncated one. job.sync
never uploads the temporary names. No TensorFlow here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from job.errors import JobError

# `.tmp-<token>-<name>`: hidden, skipped by job.sync, and ending like the final name, so that writers that
# pick a format by suffix (Keras' `.keras` / `.weights.h5`, matplotlib's `.png`) write the right one.
TEMP_PREFIX = ".tmp-"
TEMP_TOKEN_CHARS = 8
JSON_INDENT = 2
TORN = "is empty or torn (a crash while writing?)"
CACHE_KEY_CHARS = 16  # hex digits of a cache key: a short directory name


def temp_name(path: Path) -> Path:
    """A fresh temporary sibling of `path` that keeps its suffixes."""
    return path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:TEMP_TOKEN_CHARS]}-{path.name}")


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; when the block ends normally it replaces `path`
    (`durable`: fsynced first, and the directory after, so that a power loss leaves no empty file),
    otherwise it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_path(path.parent)


def write_text(path: Path, text: str, *, durable: bool = False) -> None:
    """Replace `path` with `text` atomically (see `atomic_path`)."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, payload: Any, *, durable: bool = False) -> None:
    """The job's one JSON writer: `payload` as indented JSON, replacing `path` atomically."""
    write_text(Path(path), json.dumps(payload, indent=JSON_INDENT), durable=durable)


def read_json(path: Path, fix: str) -> Any:
    """The JSON in `path`; one JobError naming the file and `fix` when it is empty or torn."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise JobError(f"{path} {TORN}: {fix}.") from err


def cache_key(text: str) -> str:
    """A stable short directory name for `text` (a URI, a data source's identity): its SHA-1, shortened."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:CACHE_KEY_CHARS]


def safe_relpath(rel: str) -> PurePosixPath | None:
    """`rel` (a bucket object's name below a prefix) as a relative path that stays below its root, or None when
    it is empty, absolute or has an empty, `.` or `..` part."""
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")):
        return None
    return path
