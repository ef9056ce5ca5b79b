"""A checkpoint and what a resume needs beside it, kept and published as one unit.

TF's CheckpointManager writes `ckpt-N.index` and `ckpt-N.data-*`, then rewrites the `checkpoint` index file
that names ckpt-N. The trainer writes ckpt-N's companions before that: `ckpt-N.history.json` (the epochs
completed) and `ckpt-N.best.weights.h5` (the best epoch's weights so far; the best value itself is in the
checkpoint). So every file of the unit is named `ckpt-N.*` and exists before any index names ckpt-N; the
syncer publishes them before that index (job/syncplan.py) and a resume adopts the companions of the
checkpoint it restores, never the newer or older files one folder up. No TensorFlow here.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.files import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

INDEX_NAME = "checkpoint"  # TF's CheckpointState file
CHECKPOINT_NAME = "ckpt"  # CheckpointManager's checkpoint_name: files ckpt-<step>.*
HISTORY_SUFFIX = ".history.json"
BEST_WEIGHTS_SUFFIX = ".best.weights.h5"
UNIT_FILE_RE = re.compile(r"^(?P<unit>[^./]+-\d+)\.(?P<part>.+)$")  # ckpt-12.index, ckpt-12.history.json
DATA_SHARD_RE = re.compile(r"^data-(?P<shard>\d{5})-of-(?P<shards>\d{5})$")
INDEX_ENTRY_RE = re.compile(r'^\s*(?P<key>model_checkpoint_path|all_model_checkpoint_paths)\s*:\s*"(?P<path>[^"]*)"')


@dataclass(frozen=True)
class CheckpointIndex:
    """What a `checkpoint` index file names: the latest checkpoint and every one it keeps (file name stems)."""

    latest: str | None
    named: tuple[str, ...]


def parse_index(text: str) -> CheckpointIndex:
    """Parse TF's CheckpointState text; paths are reduced to their names (the unit lives beside the index)."""
    latest, named = None, []
    for line in text.splitlines():
        if match := INDEX_ENTRY_RE.match(line):
            name = match["path"].replace("\\", "/").rsplit("/", 1)[-1]
            if match["key"] == "model_checkpoint_path":
                latest = name
            elif name not in named:
                named.append(name)
    if latest is not None and latest not in named:
        named.append(latest)
    return CheckpointIndex(latest, tuple(named))


def unit_of(name: str) -> str | None:
    """The checkpoint (`ckpt-N`) a file of a checkpoint directory belongs to, or None (the index, others)."""
    match = UNIT_FILE_RE.match(name)
    return match["unit"] if match else None


def is_complete(unit: str, names: Collection[str]) -> bool:
    """Whether `names` (files of one directory) hold checkpoint `unit`'s index and every data shard."""
    if f"{unit}.index" not in names:
        return False
    shards = [m for name in names if unit_of(name) == unit
              and (m := DATA_SHARD_RE.match(name.removeprefix(f"{unit}.")))]
    return bool(shards) and len(shards) == int(shards[0]["shards"])


def history_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + HISTORY_SUFFIX)


def best_weights_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + BEST_WEIGHTS_SUFFIX)


def stamp(prefix: Path, history: list[dict[str, Any]], best_weights: Path | None) -> None:
    """Write checkpoint `prefix`'s companions, before TF writes the checkpoint: its history and a hard link to
    (or, where links are not supported, a copy of) the best weights as they are now."""
    write_json(history_path(prefix), history)
    target = best_weights_path(prefix)
    if best_weights is None or not best_weights.is_file():
        target.unlink(missing_ok=True)
        return
    with atomic_path(target) as tmp:
        try:
            os.link(best_weights, tmp)  # the file is replaced (renamed over) on improvement: the link keeps this one
        except OSError:
            shutil.copyfile(best_weights, tmp)


@dataclass(frozen=True)
class Companions:
    history: list[dict[str, Any]]
    best_weights: Path | None


def companions(prefix: Path) -> Companions | None:
    """Checkpoint `prefix`'s companions, or None for a checkpoint written before they existed."""
    history = history_path(prefix)
    if not history.is_file():
        return None
    fix = f"delete {prefix.parent} to restart the stage from scratch, or rerun with --force"
    best = best_weights_path(prefix)
    return Companions(read_json(history, fix), best if best.is_file() else None)


def adopt_best_weights(unit: Companions, best_path: Path) -> None:
    """Make `best_path` the unit's best weights (none yet: no file), whatever a later epoch left there."""
    if unit.best_weights is None:
        best_path.unlink(missing_ok=True)
        return
    with atomic_path(best_path) as tmp:
        shutil.copyfile(unit.best_weights, tmp)


def sweep(ckpt_dir: Path, kept: Iterable[str]) -> None:
    """Delete the companions of checkpoints no longer kept (TF deletes their index and data files itself)."""
    keep = {Path(path).name for path in kept}
    for entry in os.scandir(ckpt_dir):
        name = entry.name
        if (unit := unit_of(name)) is not None and unit not in keep and name.endswith(
                (HISTORY_SUFFIX, BEST_WEIGHTS_SUFFIX)):
            Path(entry.path).unlink(missing_ok=True)
            log.debug("Dropped %s with its checkpoint", entry.path)
