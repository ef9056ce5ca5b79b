"""The record of what a mirror last synced, kept beside it (`<mirror>.sync.json`): each file's local stat when it
matched the bucket, and the bucket's generation of it. A push uploads what changed since; a pull tells this
mirror's own newer work from the bucket's (job/sync.py). Without a record, the bucket decides."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from job.files import write_json
from job.transfer import StatKey

__all__ = ["STATE_SUFFIX", "SyncRecord"]

logger = logging.getLogger(__name__)

STATE_SUFFIX = ".sync.json"  # beside the mirror (not in it): what this mirror last synced


@dataclass
class SyncRecord:
    """`synced`: local files as they were when they matched the bucket; `generations`: the bucket's objects
    (as this mirror last saw them: a listing replaces them)."""

    path: Path
    remote: str
    synced: dict[str, StatKey] = field(default_factory=dict)
    generations: dict[str, int | None] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, remote: str) -> SyncRecord:
        """The record at `path` from an earlier process; an empty one when there is none, it is another
        output's, or it is unreadable."""
        record = cls(path, remote)
        if not path.is_file():
            return record
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if state.get("remote") != remote:
                return record
            record.synced = {rel: (int(key[0]), int(key[1])) for rel, key in state["synced"].items()}
            record.generations = dict(state["generations"])
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            logger.warning("Ignoring %s (unreadable): the bucket's version of every file decides", path)
            record.synced, record.generations = {}, {}
        return record

    def save(self) -> None:
        write_json(self.path, {"remote": self.remote, "synced": self.synced, "generations": self.generations})

    def record(self, rel: str, key: StatKey, generation: int | None) -> None:
        """`rel` matches the bucket's object `generation` while the local file's stat is `key`."""
        self.synced[rel] = key
        self.generations[rel] = generation

    def forget(self, rel: str, *, remote: bool) -> None:
        """`rel` no longer matches (and, with `remote`, the bucket no longer holds it)."""
        self.synced.pop(rel, None)
        if remote:
            self.generations.pop(rel, None)
