"""What a push uploads (and deletes) and in which order, and what a pull takes from the bucket: pure decisions,
no I/O, so that they are tested without a bucket (job/sync.py carries them out).

Push: other files first; then each checkpoint directory's unit: the files of the checkpoints its `checkpoint`
index names (`ckpt-N.*`: TF's data and index files and the trainer's companions, job/units.py), then that
index, then the bucket's files of checkpoints the index no longer names; completion markers (`done.json`) last
of all, and only when everything else went up. So the bucket never names a checkpoint whose files or
companions are missing or older.

Pull: the bucket's published state decides, not file times. In a checkpoint directory the bucket's index and
the files of its latest checkpoint are taken (nothing else), unless the local index is this mirror's own
newer work, not yet pushed, whose latest checkpoint is complete. Any other file is downloaded unless it is
the same, or changed here since this mirror last synced it while the bucket still holds the version it saw.
"""

from __future__ import annotations

import enum
import re
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from job.files import TEMP_PREFIX
from job.layout import DONE
from job.units import INDEX_NAME, CheckpointIndex, is_complete, parse_index, unit_of

# Written last in their directory: TF CheckpointManager's index file (it names the data files beside it).
INDEX_MARKER_NAMES = frozenset({INDEX_NAME})
# Written last of all: a stage's completion marker (done.json, the only one the job writes) vouches for files
# anywhere in the run (its exported model, its checkpoints), so it goes up only after everything else went up.
COMPLETION_MARKER_NAMES = frozenset({DONE})

# Being written right now: never uploaded (they get renamed to their final name when complete).
TEMP_SUFFIXES = (".tmp", ".partial")
TEMP_PREFIXES = ("tmp", TEMP_PREFIX)  # TEMP_PREFIX: job.files.atomic_path's names
TF_ATOMIC_WRITE_RE = re.compile(r"\.tmp[0-9a-f]{32}$")  # file_io.atomic_write_string_to_file
TF_SHARDED_TEMP_DIR_SUFFIX = "_temp"  # sharded saves write to <prefix>_temp/part-* first


def is_completion_marker(rel: str) -> bool:
    """True for files that must be uploaded after every other file of the run."""
    name = PurePosixPath(rel).name
    return name in COMPLETION_MARKER_NAMES


def is_index(rel: str) -> bool:
    return PurePosixPath(rel).name in INDEX_MARKER_NAMES


def is_marker(rel: str) -> bool:
    """True for files that must be uploaded after (and downloaded after) the data they point to."""
    return is_index(rel) or is_completion_marker(rel)


def is_in_progress(rel: str) -> bool:
    """True for temp files (and files inside TF temp dirs) that are still being written."""
    parts = PurePosixPath(rel).parts
    name = parts[-1]
    if name.endswith(TEMP_SUFFIXES) or name.startswith(TEMP_PREFIXES) or TF_ATOMIC_WRITE_RE.search(name):
        return True
    return any(is_temp_dir(part) for part in parts[:-1])


def is_temp_dir(name: str) -> bool:
    return name.endswith(TF_SHARDED_TEMP_DIR_SUFFIX) or name.startswith(TEMP_PREFIXES)


def parent(rel: str) -> str:
    directory = PurePosixPath(rel).parent.as_posix()
    return "" if directory == "." else directory


def _join(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory else name


def _index_rel(directory: str) -> str:
    return _join(directory, INDEX_NAME)


def _unit(rel: str) -> str | None:
    return unit_of(PurePosixPath(rel).name)


def _names_in(rels: Iterable[str]) -> dict[str, set[str]]:
    names: dict[str, set[str]] = defaultdict(set)
    for rel in rels:
        names[parent(rel)].add(PurePosixPath(rel).name)
    return names


# -- push --------------------------------------------------------------------------------------------
@dataclass
class UnitPush:
    """One checkpoint directory: `uploads` (files of the checkpoints `index` names), then `index`, then `deletes`
    (the bucket's files of checkpoints it no longer names). `held_back`: why none of it happens this time."""

    directory: str
    index: str
    latest: str | None = None
    uploads: list[str] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    held_back: str | None = None


@dataclass
class PushPlan:
    data: list[str] = field(default_factory=list)  # everything else, first, in any order
    units: list[UnitPush] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)  # last, when nothing else failed or was held back
    waiting: list[str] = field(default_factory=list)  # files of checkpoints no published index names (yet)


def plan_push(changed: Collection[str], local: Collection[str], remote: Collection[str],
              indexes: Mapping[str, str]) -> PushPlan:
    """The order of one push.

    changed: finished local files that differ from what this mirror last synced; local: every finished local
    file; remote: what the bucket holds (as far as this mirror knows); indexes: the text of each changed
    `checkpoint` index by its relative path, read before `local` was listed (so that the files it names,
    written before it, are listed too).
    """
    plan = PushPlan()
    local_names, remote_names = _names_in(local), _names_in(remote)
    published: dict[str, CheckpointIndex] = {parent(rel): parse_index(text) for rel, text in indexes.items()}
    for directory, index in sorted(published.items()):
        plan.units.append(_plan_unit(directory, index, changed, local_names[directory], remote_names[directory]))
    in_units = {rel for unit in plan.units for rel in unit.uploads}
    for rel in sorted(changed):
        if is_completion_marker(rel):
            plan.completions.append(rel)
        elif is_index(rel) or rel in in_units:
            continue
        elif _unit(rel) is not None and (_index_rel(parent(rel)) in local or parent(rel) in published):
            plan.waiting.append(rel)  # a checkpoint being written, or one its index has already dropped
        else:
            plan.data.append(rel)
    return plan


def _plan_unit(directory: str, index: CheckpointIndex, changed: Collection[str], local: set[str],
               remote: set[str]) -> UnitPush:
    unit = UnitPush(directory, _index_rel(directory), index.latest)
    if index.latest is not None and not is_complete(index.latest, local | remote):
        unit.held_back = f"{_join(directory, index.latest)} is incomplete"
        return unit
    named = set(index.named)
    unit.uploads = sorted(rel for rel in changed if parent(rel) == directory and _unit(rel) in named)
    unit.deletes = sorted(_join(directory, name) for name in remote if (u := unit_of(name)) and u not in named)
    return unit


# -- pull --------------------------------------------------------------------------------------------
class LocalState(enum.Enum):
    """A file of the mirror compared with the bucket (for a file the bucket holds) or with the sync record."""

    MISSING = "missing"  # not in the mirror
    SAME = "same"  # the bucket's content
    OURS = "ours"  # changed here since this mirror synced it, and the bucket still holds the version synced
    OTHER = "other"  # differs, and not known to be newer work of this mirror: the bucket's version wins
    GONE = "gone"  # in the mirror as last synced, but no longer in the bucket (deleted there, e.g. --force)
    UNPUBLISHED = "unpublished"  # only in the mirror, never synced: this mirror's work, kept


@dataclass
class PullPlan:
    downloads: list[str] = field(default_factory=list)  # first
    markers: list[str] = field(default_factory=list)  # indexes and completion markers: after what they vouch for
    removes: list[str] = field(default_factory=list)  # mirror files the bucket's published state does not hold
    kept: list[str] = field(default_factory=list)  # this mirror's newer work, pushed next
    skipped: list[str] = field(default_factory=list)  # bucket files a resume does not need


def plan_pull(states: Mapping[str, LocalState], remote_indexes: Mapping[str, str],
              local_indexes: Mapping[str, str]) -> PullPlan:
    """What to take from the bucket.

    states: every file of the bucket and of the mirror, compared (a file only in the mirror is GONE or
    UNPUBLISHED); remote_indexes / local_indexes: the text of each `checkpoint` index in the bucket / the
    mirror, by relative path.
    """
    plan = PullPlan()
    members: dict[str, list[str]] = defaultdict(list)  # checkpoint files by directory
    for rel in states:
        if _unit(rel) is not None:
            members[parent(rel)].append(rel)
    checkpoint_dirs = {parent(rel) for rel in (*remote_indexes, *local_indexes)}
    for rel, text in sorted(remote_indexes.items()):
        directory = parent(rel)
        if states[rel] is LocalState.OURS and _complete_here(rel, local_indexes, states, members[directory]):
            plan.kept.append(rel)  # this mirror's newer checkpoint, whole: published by the next push
            continue
        index = parse_index(text)
        for member in sorted(members[directory]):
            state, unit = states[member], _unit(member)
            if state in (LocalState.GONE, LocalState.UNPUBLISHED):
                if unit not in index.named:
                    plan.removes.append(member)  # not part of the state adopted from the bucket
            elif unit != index.latest:
                plan.skipped.append(member)  # an older checkpoint, or one no index names: a resume needs neither
                if state is not LocalState.MISSING and unit not in index.named:
                    plan.removes.append(member)
            elif state is not LocalState.SAME:
                plan.downloads.append(member)
        if states[rel] is not LocalState.SAME:
            plan.markers.append(rel)
    adopted = {parent(rel) for rel in remote_indexes}
    for rel, state in sorted(states.items()):
        directory = parent(rel)
        if directory in adopted and (_unit(rel) is not None or is_index(rel)):
            continue  # decided above
        if _unit(rel) is not None and directory in checkpoint_dirs and state in (LocalState.MISSING,
                                                                                  LocalState.OTHER):
            plan.skipped.append(rel)  # files of a checkpoint no index in the bucket names
        elif state in (LocalState.MISSING, LocalState.OTHER):
            (plan.markers if is_marker(rel) else plan.downloads).append(rel)
        elif state is LocalState.OURS:
            plan.kept.append(rel)
        elif state is LocalState.GONE:
            plan.removes.append(rel)
    return plan


def _complete_here(index_rel: str, local_indexes: Mapping[str, str], states: Mapping[str, LocalState],
                   members: Iterable[str]) -> bool:
    """Whether the mirror's own index names a latest checkpoint whose files are all in the mirror."""
    text = local_indexes.get(index_rel)
    latest = parse_index(text).latest if text is not None else None
    present = {PurePosixPath(rel).name for rel in members if states[rel] is not LocalState.MISSING}
    return latest is not None and is_complete(latest, present)
