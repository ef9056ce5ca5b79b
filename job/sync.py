"""Artifacts out: mirror a local run directory to a gs:// prefix (push, pull, clear; open_output).

What a push uploads and in which order, and what a pull takes, are decided in job/syncplan.py; this module
carries them out with the transfers of job/transfer.py, keeps the record of what this mirror last synced
(job/syncrecord.py), clears a stage in the bucket (`clear`), runs the periodic push (job/syncrunner.py) and
holds the output's lease (job/lease.py) while it runs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Self

from google.cloud import storage

from job.errors import JobError, StorageError
from job.files import cache_key, safe_relpath
from job.gcs import DEFAULT_RETRY_DEADLINE_S, REQUEST_TIMEOUT_S, GcsUri, checksum_mismatch, describe_error
from job.lease import LEASE_NAME, Holder, OutputLease, lease_ttl
from job.syncplan import (
    LocalState,
    UnitPush,
    is_completion_marker,
    is_in_progress,
    is_index,
    is_marker,
    is_temp_dir,
    parent,
    plan_pull,
    plan_push,
)
from job.syncrecord import STATE_SUFFIX, SyncRecord
from job.syncrunner import PeriodicRunner
from job.transfer import TRANSFER_WORKERS, Failure, PrefixObjects, Snapshot, StatKey, Uploaded, stat_key
from job.units import unit_of

__all__ = [
    "STATE_SUFFIX", "OutputSync", "SyncStats", "is_completion_marker", "is_in_progress", "is_marker", "open_output",
]

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 60.0


@dataclass
class SyncStats:
    """What one push did. `requests` counts HTTP operations issued by this module, retries included."""

    files_uploaded: int = 0
    bytes_uploaded: int = 0
    requests: int = 0
    seconds: float = 0.0


class OutputSync:
    """Mirrors a local run directory to a gs:// prefix."""

    def __init__(
        self,
        remote: str,
        local_dir: Path,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        client: storage.Client | None = None,
        retry_deadline_s: float = DEFAULT_RETRY_DEADLINE_S,
        workers: int = TRANSFER_WORKERS,
        state_path: Path | None = None,
    ) -> None:
        self._objects = PrefixObjects(remote, client=client, retry_deadline_s=retry_deadline_s, workers=workers)
        self.remote = self._objects.remote
        self.local_dir = Path(local_dir)
        self.interval_s = interval_s
        self._lock = threading.RLock()  # RLock: close() from a signal handler may interrupt push() in-thread
        self._runner = PeriodicRunner(self.push, interval_s, self.remote)
        state_path = state_path or self.local_dir.with_name(self.local_dir.name + STATE_SUFFIX)
        self._record = SyncRecord.load(state_path, self.remote)
        self._closed_stats: SyncStats | None = None
        self._lease: OutputLease | None = None
        self.last_stats: SyncStats | None = None
        self.last_error: StorageError | None = None

    @property
    def client(self) -> storage.Client:
        """The GCS client (made on first use)."""
        return self._objects.client

    def _push_failure(self, failures: list[Failure], total: int) -> StorageError:
        rel, exc = failures[0]
        return StorageError(
            f"Could not upload {len(failures)} of {total} file(s) to {self.remote} "
            f"(first: {rel}: {describe_error(exc)}); the local copy is kept at {self.local_dir} and nothing "
            f"was deleted: rerun, or copy it with `gcloud storage rsync -r {self.local_dir} {self.remote}`."
        )

    def _list_remote(self) -> dict[str, storage.Blob]:
        """The run's objects by relative path (the lease left out); refreshes the record's generations."""
        found = {rel: blob for rel, blob in self._objects.list().items() if rel != LEASE_NAME}
        self._record.generations = {rel: blob.generation for rel, blob in found.items()}
        return found

    # -- the lease -----------------------------------------------------------------------------------

    def acquire(self, job: str | None, take_over: bool = False) -> None:
        """Hold the output's lease (job/lease.py) before writing anything; renewed at every push, released by
        close(). JobError (exit 2) when another live job holds it."""
        holder = Holder.this_process(job, lease_ttl(self.interval_s))
        objects = self._objects
        lease = OutputLease(objects.bucket(), objects.prefix + LEASE_NAME, self.remote, holder, objects.retry(),
                            REQUEST_TIMEOUT_S)
        lease.acquire(take_over)
        self._lease = lease

    def release(self) -> None:
        """Give the output's lease back (if held): another job may write the output now."""
        lease, self._lease = self._lease, None
        if lease is None:
            return
        try:
            lease.release()
        except StorageError as err:  # it expires by itself
            logger.warning("Could not release the lease of %s: %s", self.remote, err)

    # -- pull ----------------------------------------------------------------------------------------

    def pull(self) -> int:
        """Make the mirror the bucket's published state (job/syncplan.py: the latest checkpoint of each
        checkpoint directory and every other file; this mirror's own unpushed work kept); returns files pulled."""
        with self._lock:
            start = time.monotonic()
            seen = dict(self._record.generations)  # the bucket as this mirror last saw it (the listing replaces it)
            remote = {rel: blob for rel, blob in self._list_remote().items()
                      if not is_in_progress(rel) and self._local_path(rel) is not None}
            local = set(self._walk())
            states = {rel: self._state(rel, remote.get(rel), seen) for rel in sorted(remote.keys() | local)}
            indexes = [rel for rel in remote if is_index(rel)]
            fetched, failures = self._objects.fetch([(rel, remote[rel]) for rel in indexes])
            if failures:
                raise self._pull_failure(failures, len(indexes))
            remote_indexes = {rel: fetched[rel].decode("utf-8", "replace") for rel in indexes}
            local_indexes = {rel: (self.local_dir / rel).read_text(encoding="utf-8", errors="replace")
                             for rel in local if is_index(rel)}
            plan = plan_pull(states, remote_indexes, local_indexes)
            for rel in plan.removes:
                (self.local_dir / rel).unlink(missing_ok=True)
                self._record.forget(rel, remote=states[rel] is LocalState.GONE)
            for rel in plan.kept:
                logger.info("Keeping %s: this mirror's newer version (the next push uploads it)", self.local_dir / rel)
            failures = self._download_many([(rel, remote[rel]) for rel in plan.downloads])
            if not failures:  # an index file pointing at missing data would break a restore
                failures = self._download_many([(rel, remote[rel]) for rel in plan.markers])
            todo = len(plan.downloads) + len(plan.markers)
            self._record.save()
            logger.info(
                "Pulled %d file(s) from %s into %s in %.1f s (%d not needed: older checkpoints)",
                todo - len(failures), self.remote, self.local_dir, time.monotonic() - start, len(plan.skipped),
            )
            if failures:
                raise self._pull_failure(failures, todo)
            return todo

    def _pull_failure(self, failures: list[Failure], total: int) -> StorageError:
        rel, exc = failures[0]
        return StorageError(
            f"Could not download {len(failures)} of {total} file(s) from {self.remote} into "
            f"{self.local_dir} (first: {rel}: {describe_error(exc)}): rerun to fetch only what is missing."
        )

    def _state(self, rel: str, blob: storage.Blob | None, seen: dict[str, int | None]) -> LocalState:
        """How the mirror's `rel` compares with the bucket's object (or, for a file only here, with the record;
        `seen`: the bucket's generations as this mirror last saw them)."""
        path = self.local_dir / rel
        key = stat_key(path) if path.is_file() else None
        recorded = self._record.synced.get(rel)
        if blob is None:
            known = key is not None and key == recorded and rel in seen
            return LocalState.GONE if known else LocalState.UNPUBLISHED
        if key is None:
            return LocalState.MISSING
        unchanged = rel in seen and seen[rel] == blob.generation
        if (key == recorded and unchanged) or checksum_mismatch(path, blob) is None:
            self._record.record(rel, key, blob.generation)
            return LocalState.SAME
        return LocalState.OURS if recorded is not None and unchanged else LocalState.OTHER

    def _local_path(self, rel: str) -> Path | None:
        path = safe_relpath(rel)
        if path is None:
            logger.warning("Skipping %s: unsafe relative path", self._objects.uri(rel))
            return None
        return self.local_dir.joinpath(*path.parts)

    def _download_many(self, items: list[tuple[str, storage.Blob]]) -> list[Failure]:
        """Download `items` into the mirror (and the record)."""
        return self._objects.download_files(
            self.local_dir, items, lambda rel, key, blob: self._record.record(rel, key, blob.generation)
        )

    # -- clear ---------------------------------------------------------------------------------------

    def clear(self, rel_dir: str) -> int:
        """Delete everything under `rel_dir` in the bucket, completion markers first (--force redoing a stage:
        an interrupted redo must not find the old stage complete there); returns the objects deleted."""
        with self._lock:
            prefix = rel_dir.strip("/") + "/"
            found = {rel: blob for rel, blob in self._list_remote().items() if rel.startswith(prefix)}
            ordered = sorted(found, key=lambda rel: (not is_completion_marker(rel), not is_index(rel), rel))
            for rel in ordered:
                self._delete(rel, strict=True)
            for rel in [rel for rel in self._record.synced if rel.startswith(prefix)]:
                self._record.forget(rel, remote=True)
            self._record.save()
            if ordered:
                logger.info("Deleted %d object(s) under %s%s", len(ordered), self.remote, prefix)
            return len(ordered)

    def _delete(self, rel: str, *, strict: bool) -> None:
        """Delete one object (already gone is fine); `strict`: a failure raises, else it is retried later."""
        try:
            self._objects.delete(rel)
        except StorageError as err:
            if strict:
                raise
            logger.warning("Could not delete %s (retried at the next push): %s", self._objects.uri(rel), err)
            return
        self._record.forget(rel, remote=True)

    # -- push ----------------------------------------------------------------------------------------

    def push(self) -> SyncStats:
        """Upload what changed since the last push, in job/syncplan.py's order, and delete the bucket's files of
        checkpoints no index names any more. Raises StorageError (LeaseLost when another job took the output)."""
        with self._lock:
            start = time.monotonic()
            requests_before = self._objects.requests
            stats = SyncStats()
            if self._lease is not None:
                self._lease.renew()
            # Markers are read first: whatever they vouch for (or name) was written before them, so it is in
            # the walk that follows.
            markers = self._snapshot(sorted(self._changed(r for r in self._walk() if is_marker(r))))
            local = set(self._walk())
            changed = self._changed(local)
            changed.update((rel, key) for rel, key, _ in markers)  # the versions uploaded, whatever happens next
            if changed:
                _ = self.client  # credential problems surface here, with their own fix
            unsure = [rel for rel in changed if rel not in self._record.synced]
            if unsure:
                try:
                    self._drop_identical_remote(changed, unsure)
                except StorageError as exc:  # only an optimisation: upload them all instead
                    logger.warning("Could not compare with %s, uploading everything: %s", self.remote, exc)
            snapshots = {rel: (key, data) for rel, key, data in markers if rel in changed}
            indexes = {rel: data.decode("utf-8", "replace") for rel, (_, data) in snapshots.items() if is_index(rel)}
            plan = plan_push(changed.keys(), local | snapshots.keys(), self._record.generations.keys(), indexes)
            failures = self._upload_many(plan.data, stats)
            held_back = False
            for unit in plan.units:
                unit_failures, published = self._push_unit(unit, snapshots, failures, stats)
                failures += unit_failures
                held_back = held_back or not published
            completions = [(rel, *snapshots[rel]) for rel in plan.completions]
            if completions and (failures or held_back):
                why = f"{len(failures)} other file(s) failed to upload" if failures else "a checkpoint was held back"
                logger.warning("Not uploading %s: %s", [c[0] for c in completions], why)
            elif completions:
                failures += self._upload_snapshots(completions, stats)
            self._record.save()
            stats.requests = self._objects.requests - requests_before
            stats.seconds = time.monotonic() - start
            self.last_stats = stats
            if failures:
                self.last_error = self._push_failure(failures, max(len(changed), len(failures)))
                raise self.last_error from failures[0][1]
            if stats.files_uploaded:
                logger.info(
                    "Pushed %d file(s), %.1f MB to %s in %.1f s (%d requests)",
                    stats.files_uploaded,
                    stats.bytes_uploaded / 1e6,
                    self.remote,
                    stats.seconds,
                    stats.requests,
                )
            return stats

    def _push_unit(
        self, unit: UnitPush, snapshots: dict[str, tuple[StatKey, bytes]], failures: list[Failure], stats: SyncStats
    ) -> tuple[list[Failure], bool]:
        """A checkpoint directory's files, then its index, then the deletions; (failures, index published)."""
        where = unit.directory or "."
        if unit.held_back is not None:
            logger.warning("Not uploading %s yet: %s", unit.index, unit.held_back)
            return [], False
        if any(parent(rel) == unit.directory for rel, _ in failures):
            logger.warning("Not uploading %s: other files in %s/ failed to upload", unit.index, where)
            return [], False
        vanished: list[str] = []
        unit_failures = self._upload_many(unit.uploads, stats, vanished=vanished)
        if unit_failures:
            logger.warning("Not uploading %s: other files in %s/ failed to upload", unit.index, where)
            return unit_failures, False
        if any(unit_of(PurePosixPath(rel).name) == unit.latest for rel in vanished):
            logger.warning("Not uploading %s yet: %s vanished while uploading", unit.index, vanished)
            return [], False
        key, data = snapshots[unit.index]
        unit_failures = self._upload_snapshots([(unit.index, key, data)], stats)
        if unit_failures:
            return unit_failures, False
        for rel in unit.deletes:
            self._delete(rel, strict=False)
        return [], True

    def _walk(self) -> Iterable[str]:
        """Relative paths of the mirror's finished files."""
        found: list[str] = []
        for root, dirnames, filenames in os.walk(self.local_dir):
            rel_root = Path(root).relative_to(self.local_dir).as_posix()
            rel_root = "" if rel_root == "." else rel_root
            dirnames[:] = [d for d in dirnames if not is_temp_dir(d)]
            for name in filenames:
                rel = f"{rel_root}/{name}" if rel_root else name
                if not is_in_progress(rel):
                    found.append(rel)
        return found

    def _changed(self, rels: Iterable[str]) -> dict[str, StatKey]:
        changed: dict[str, StatKey] = {}
        for rel in rels:
            try:
                key = stat_key(self.local_dir / rel)
            except FileNotFoundError:
                continue  # deleted since the walk (e.g. CheckpointManager max_to_keep)
            if self._record.synced.get(rel) != key:
                changed[rel] = key
        return changed

    def _drop_identical_remote(self, changed: dict[str, StatKey], unsure: list[str]) -> None:
        """Files we have no record of (first push, or after a restart): skip those already remote (md5)."""
        remote = self._list_remote()
        for rel in unsure:
            blob = remote.get(rel)
            if blob is None or blob.size is None or int(blob.size) != changed[rel][0]:
                continue
            try:
                same = checksum_mismatch(self.local_dir / rel, blob) is None
            except FileNotFoundError:
                same = False
            if same:
                self._record.record(rel, changed.pop(rel), blob.generation)

    def _upload_many(self, rels: list[str], stats: SyncStats, vanished: list[str] | None = None) -> list[Failure]:
        return self._objects.upload_files(self.local_dir, rels, self._uploaded(stats), vanished)

    def _uploaded(self, stats: SyncStats) -> Uploaded:
        """Record an uploaded file and count it in `stats`."""

        def record(rel: str, key: StatKey, generation: int | None) -> None:
            self._record.record(rel, key, generation)
            stats.files_uploaded += 1
            stats.bytes_uploaded += key[0]

        return record

    def _snapshot(self, rels: Iterable[str]) -> list[Snapshot]:
        """(rel, stat, contents) of each file now: the version uploaded, whatever happens to it meanwhile."""
        snapshots: list[Snapshot] = []
        for rel in rels:
            try:
                key = stat_key(self.local_dir / rel)
                snapshots.append((rel, key, (self.local_dir / rel).read_bytes()))
            except FileNotFoundError:
                continue
        return snapshots

    def _upload_snapshots(self, snapshots: list[Snapshot], stats: SyncStats) -> list[Failure]:
        return self._objects.upload_snapshots(snapshots, self._uploaded(stats))

    # -- the periodic push and the final one --------------------------------------------------------

    def start(self) -> None:
        """Start a daemon thread that calls push() every interval_s (failures are logged and retried)."""
        if self._closed_stats is not None:
            raise RuntimeError(f"OutputSync for {self.remote} is closed")
        self._runner.start()

    def close(self) -> SyncStats:
        """Stop the thread and do a final push; later calls return the same stats."""
        if self._closed_stats is not None:
            return self._closed_stats
        self._runner.stop()  # lets an in-flight push finish (the lock would serialise us anyway)
        try:
            stats = self.push()
        finally:
            self.release()
        self._closed_stats = stats
        self._objects.close()  # releases pooled connections
        return stats

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except StorageError as close_exc:  # don't mask the job's own exception
            logger.error("%s", close_exc)


def open_output(output: str, work_root: Path, interval_s: float = DEFAULT_INTERVAL_S,
                mirror: str = "") -> tuple[Path, OutputSync | None]:
    """Local output → (Path(output), None); gs://… → (work_root/<cache_key(uri)><mirror>, an unstarted OutputSync).

    `mirror`: a suffix for a mirror of one's own (the other workers of a multi-worker job: only their pulls
    write into it, never the chief's training). The job writes to the returned directory. For gs://, call
    `pull()` to resume, `start()` for periodic pushes, and `close()` (or use it as a context manager) for
    the final push.
    """
    check_output_uri(output)
    if output.startswith("gs://"):
        local = Path(work_root) / f"{cache_key(output)}{mirror}"
        local.mkdir(parents=True, exist_ok=True)
        return local, OutputSync(output, local, interval_s=interval_s)
    return Path(output), None


def check_output_uri(output: str) -> None:
    """A JobError unless --output is a local path or a well-formed gs:// URI."""
    if output.startswith("gs://"):
        GcsUri.parse(output)
    elif "://" in output:
        raise JobError(f"{output} uses an unsupported scheme: pass a local directory or gs://BUCKET/PREFIX.")
