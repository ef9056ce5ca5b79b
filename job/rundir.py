"""Whether a run directory may be used: writable, holding results of these settings and data, --force once.

A stage's done.json carries a fingerprint: the settings that shape its result and the identity of the data.
Before anything is written, every completed stage is compared with what this invocation would make; a
mismatch is one JobError naming the stage, what changed and the fix (`--force`, or another `--output`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job.config import Config, dotted_settings
from job.data import source_identity
from job.errors import JobError, from_os_error
from job.fetch import fetched_version
from job.files import read_json, write_json
from job.gcs import redact
from job.layout import RunLayout

log = logging.getLogger(__name__)

FINGERPRINT_KEY = "fingerprint"

# Settings that cannot change any stage's result: caching, how the train images are held (data.store: the same
# pixels, decoded or encoded), input-pipeline parallelism, logging, checkpoint
# cadence (resume is exact at any step), steps per traced call (the same steps), syncing, ports, the report's
# figures, the class names (labels of the report), the download's expected checksum (the data's identity
# records the file's own), and XLA (it compiles the same computation). Mixed precision changes the
# arithmetic: it counts.
NO_EFFECT = frozenset({
    "data.cache_dir", "data.decode_threads", "data.prefetch_batches", "data.downstream_names", "data.sha256",
    "data.store",
    "runtime.checkpoint_every_steps", "runtime.keep_checkpoints", "runtime.log_every_steps", "runtime.steps_per_loop",
    "runtime.sync_interval_s", "runtime.slurm_port_base", "runtime.slurm_port_count", "runtime.barrier_timeout_s",
    "runtime.xla", "evaluate.report_examples",
})
RUNTIME_KEYS = frozenset({"runtime.seed", "runtime.mixed_precision"})
# Kinds of completed results, in pipeline order, and the sections each depends on.
PRETRAIN, DOWNSTREAM, EVALUATE = "pretrain", "downstream", "evaluate"
KIND_ORDER = (PRETRAIN, DOWNSTREAM, EVALUATE)
SECTIONS = {
    PRETRAIN: ("data", "model", "pretext"),
    DOWNSTREAM: ("data", "model", "pretext", "finetune", "evaluate"),
    EVALUATE: ("data", "model", "pretext", "finetune", "evaluate"),
}
NOT_PRETEXT = frozenset({"data.downstream_wnids", "model.classifier_dropout"})  # the pretext task never sees them
# The first kind of result each command redoes under --force (evaluate trains downstream runs too).
FORCED_FROM = {"pretrain": PRETRAIN, "finetune": DOWNSTREAM, "evaluate": DOWNSTREAM}
MAX_CHANGES_SHOWN = 3
REDO_FIX = "delete it to redo that stage, or rerun with --force"  # for a torn done.json

SLURM_JOB_ID, SLURM_RESTART_COUNT, VERTEX_JOB_ID = "SLURM_JOB_ID", "SLURM_RESTART_COUNT", "CLOUD_ML_JOB_ID"


# -- the output directory ----------------------------------------------------------------------------
def check_output_dir(path: Path) -> None:
    """Raise one JobError when `path` cannot be a run directory: a file, under a file, or not writable."""
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under the file {existing}"
        raise JobError(f"--output {path} {where}: pass a directory (a new or an existing one) as --output.")
    try:  # a write, not os.access (root passes any mode bits): an unnamed file, gone on close
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        err.filename = str(existing)  # not the probe's temporary name
        raise (from_os_error(err) or JobError(f"--output {path} is not usable ({err}).")) from err


# -- fingerprints ------------------------------------------------------------------------------------
def data_identity(uri: str, local: Path) -> dict[str, Any]:
    """--data as given (local paths made absolute, query strings redacted) and its version: size and mtime of a
    local file (of every file of a tree), or the generation/etag and checksums the download recorded for gs://
    and https://."""
    if "://" in uri:  # a signed URL's query (its signature) is neither recorded nor compared
        return {"uri": redact(uri), "version": fetched_version(local)}
    path = Path(uri).expanduser().resolve()
    return {"uri": str(path), "version": source_identity(path).removeprefix(f"{path}|")}


def settings(config: Config, kind: str) -> dict[str, Any]:
    """The dotted config keys (and values) that shape results of this kind."""
    flat = dotted_settings(config.to_dict())
    return {
        key: value for key, value in flat.items()
        if (key.partition(".")[0] in SECTIONS[kind] or key in RUNTIME_KEYS) and key not in NO_EFFECT
        and not (kind == PRETRAIN and key in NOT_PRETEXT)
    }


def fingerprint(config: Config, kind: str, data: Mapping[str, Any]) -> dict[str, Any]:
    return {"settings": settings(config, kind), "data": dict(data)}


def kind_of(layout: RunLayout, stage_dir: Path) -> str:
    if stage_dir == layout.pretext:
        return PRETRAIN
    return EVALUATE if stage_dir == layout.evaluate else DOWNSTREAM


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What changed, e.g. ['model.alpha 0.5 → 1.0', '--data a.zip → b.zip']; keys one side lacks (added to the
    config since) do not count."""
    old, new = recorded.get("settings", {}), current["settings"]
    changes = [f"{key} {_show(old[key])} → {_show(new[key])}" for key in sorted(old.keys() & new.keys())
               if old[key] != new[key]]
    old_data, new_data = recorded.get("data"), current["data"]
    if old_data is not None and old_data != new_data:
        if old_data.get("uri") != new_data.get("uri"):
            changes.append(f"--data {old_data.get('uri')} → {new_data.get('uri')}")
        else:
            changes.append(f"--data {new_data.get('uri')} changed since (version {old_data.get('version')} → "
                           f"{new_data.get('version')})")
    return changes


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, list, bool)) or value is None else str(value)


def completed_stage_dirs(layout: RunLayout) -> Iterator[Path]:
    """Every stage directory of the run that holds a done.json."""
    downstream = layout.checkpoints / "downstream"
    dirs = [layout.pretext, *(sorted(downstream.iterdir()) if downstream.is_dir() else []), layout.evaluate]
    return (d for d in dirs if RunLayout.done(d).is_file())


def _redone_from(commands: list[str], force: bool) -> int:
    """The index in KIND_ORDER of the first kind of result these commands redo (past the end without --force)."""
    return min(KIND_ORDER.index(FORCED_FROM[c]) for c in commands) if force else len(KIND_ORDER)


def _changes(layout: RunLayout, stage_dir: Path, config: Config, data: Mapping[str, Any]) -> list[str] | None:
    """What differs between a completed stage and this invocation; None for a stage without a fingerprint."""
    recorded = read_json(RunLayout.done(stage_dir), REDO_FIX).get(FINGERPRINT_KEY)
    return None if recorded is None else differences(recorded, fingerprint(config, kind_of(layout, stage_dir), data))


def check_reuse(layout: RunLayout, config: Config, data: Mapping[str, Any], commands: list[str],
                force: bool) -> None:
    """Raise one JobError when a completed stage this invocation would reuse (or leave beside its results)
    was made with other settings or data. Under --force, the stages the commands redo and those after them
    are not checked: they are redone, or checked when their own command runs."""
    redone = _redone_from(commands, force)
    for stage_dir in completed_stage_dirs(layout):
        kind = kind_of(layout, stage_dir)
        if KIND_ORDER.index(kind) >= redone:
            continue
        name = stage_dir.relative_to(layout.root)
        if (changes := _changes(layout, stage_dir, config, data)) is None:
            log.warning("%s predates fingerprints: reusing it without checking its settings and data", name)
        elif changes:
            shown = "; ".join(changes[:MAX_CHANGES_SHOWN])
            more = f" and {len(changes) - MAX_CHANGES_SHOWN} more" if len(changes) > MAX_CHANGES_SHOWN else ""
            raise JobError(f"{name} ({kind}) in {layout.root} was made with other settings or data ({shown}{more}): "
                           "pass --force to redo it, or use another --output.")


def stale_results(layout: RunLayout, config: Config, data: Mapping[str, Any], commands: list[str],
                  force: bool) -> list[Path]:
    """Under --force, completed results of the kinds the commands redo that other settings or data made: those
    this invocation overwrites, and those it would leave behind (a seed or label fraction no longer configured),
    which the caller deletes so that the directory holds one run."""
    redone = _redone_from(commands, force)
    return [d for d in completed_stage_dirs(layout)
            if KIND_ORDER.index(kind_of(layout, d)) >= redone and _stale(layout, d, config, data)]


def _stale(layout: RunLayout, stage_dir: Path, config: Config, data: Mapping[str, Any]) -> bool:
    try:
        return bool(_changes(layout, stage_dir, config, data))
    except JobError:  # a torn done.json: --force redoes that stage anyway
        return True


def discard(layout: RunLayout, stage_dir: Path) -> None:
    """Delete a stage's results and its TensorBoard logs, so that a redone stage starts both afresh (old event
    files beside the new ones would show two points per step)."""
    for path in (stage_dir, layout.logs_of(stage_dir)):
        if path.exists():
            shutil.rmtree(path)


# -- --force once per job ----------------------------------------------------------------------------
def job_identity(environ: Mapping[str, str]) -> str | None:
    """The scheduler's id of this job, the same across its restarts: Slurm's job id or Vertex AI's."""
    if environ.get(SLURM_JOB_ID):
        return f"slurm:{environ[SLURM_JOB_ID]}"
    if environ.get(VERTEX_JOB_ID):
        return f"vertex:{environ[VERTEX_JOB_ID]}"
    return None


def is_restart(environ: Mapping[str, str], marker: Mapping[str, Any] | None) -> bool:
    """True when this process restarts the job that wrote the force marker (a requeue or a Vertex restart)."""
    job = job_identity(environ)
    if job is None or marker is None or marker.get("job") != job:
        return False
    if job.startswith("slurm:"):
        return int(environ.get(SLURM_RESTART_COUNT) or 0) > 0
    return True


@dataclass
class ForceRecord:
    """Which stage directories this job's --force already cleared (force.json), so that a restart resumes them."""

    path: Path
    root: Path
    job: str | None
    cleared: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, layout: RunLayout, environ: Mapping[str, str]) -> ForceRecord:
        fix = "delete it (a restart of this job then redoes the stages it cleared)"
        marker = read_json(layout.force_marker, fix) if layout.force_marker.is_file() else None
        cleared = set(marker.get("cleared", [])) if is_restart(environ, marker) else set()
        return cls(layout.force_marker, layout.root, job_identity(environ), cleared)

    def _key(self, stage_dir: Path) -> str:
        return stage_dir.relative_to(self.root).as_posix()

    def already_cleared(self, stage_dir: Path) -> bool:
        return self._key(stage_dir) in self.cleared

    def record(self, stage_dir: Path) -> None:
        """Note that this job cleared `stage_dir` (nothing to note outside a scheduler: no restarts)."""
        if self.job is None:
            return
        self.cleared.add(self._key(stage_dir))
        write_json(self.path, {"job": self.job, "cleared": sorted(self.cleared), "pid": os.getpid()})
