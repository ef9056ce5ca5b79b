"""Artifacts out: mirror a local run directory to a gs:// prefix (periodic push, final push, resume pull).

The order of uploads and what a pull takes are decided in job/syncplan.py; this module moves the files,
keeps the record of what this mirror last synced (`<mirror>.sync.json`: each file's local stat and the
bucket's generation), clears a stage in the bucket (`clear`), runs the periodic push and holds the output's
lease (job/lease.py) while it runs.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Self

from google.api_core.exceptions import NotFound
from google.api_core.retry import Retry
from google.cloud import storage

from job.errors import JobError, StorageError
from job.files import cache_key, safe_relpath, write_json
from job.gcs import (
    DEFAULT_RETRY_DEADLINE_S,
    REQUEST_TIMEOUT_S,
    GcsUri,
    checksum_mismatch,
    describe_error,
    download_blob,
    gcs_errors,
    make_client,
    make_retry,
    upload_restarting,
)
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
from job.units import unit_of

__all__ = ["OutputSync", "SyncStats", "is_completion_marker", "is_in_progress", "is_marker", "open_output"]

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 60.0
SYNC_WORKERS = 8
DEFAULT_CONTENT_TYPE = "application/octet-stream"
STATE_SUFFIX = ".sync.json"  # beside the mirror (not in it): what this mirror last synced

StatKey = tuple[int, int]  # (size, mtime_ns)
Snapshot = tuple[str, StatKey, bytes]  # (rel, stat before reading, contents)


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
        workers: int = SYNC_WORKERS,
        state_path: Path | None = None,
    ) -> None:
        uri = GcsUri.parse(remote)
        self._bucket_name = uri.bucket
        self._prefix = uri.name if not uri.name or uri.name.endswith("/") else uri.name + "/"
        self.remote = f"gs://{uri.bucket}/{self._prefix}"
        self.local_dir = Path(local_dir)
        self.interval_s = interval_s
        self._client = client
        self._owns_client = client is None
        self._retry_deadline_s = retry_deadline_s
        self._workers = max(1, workers)
        self._lock = threading.RLock()  # RLock: close() from a signal handler may interrupt push() in-thread
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state_path = state_path or self.local_dir.with_name(self.local_dir.name + STATE_SUFFIX)
        # The record: local files as they were when they matched the bucket, and the bucket's generations.
        self._synced: dict[str, StatKey] = {}
        self._remote: dict[str, int | None] = {}
        self._load_state()
        self._fetched: dict[str, bytes] = {}
        self._requests = 0
        self._closed_stats: SyncStats | None = None
        self._lease: OutputLease | None = None
        self.last_stats: SyncStats | None = None
        self.last_error: StorageError | None = None

    # -- plumbing ------------------------------------------------------------------------------------

    @property
    def client(self) -> storage.Client:
        """The GCS client (made on first use)."""
        if self._client is None:
            self._client = make_client(pool_size=self._workers)
        return self._client

    def _bucket(self) -> storage.Bucket:
        return self.client.bucket(self._bucket_name)

    def _count(self, _exc: Exception | None = None) -> None:
        with self._count_lock:
            self._requests += 1

    def _uri(self, rel: str) -> str:
        return f"{self.remote}{rel}"

    def _retry(self) -> Retry:
        return make_retry(self._retry_deadline_s, on_error=self._count)

    def _push_failure(self, failures: list[tuple[str, BaseException]], total: int) -> StorageError:
        rel, exc = failures[0]
        return StorageError(
            f"Could not upload {len(failures)} of {total} file(s) to {self.remote} "
            f"(first: {rel}: {describe_error(exc)}); the local copy is kept at {self.local_dir} and nothing "
            f"was deleted: rerun, or copy it with `gcloud storage rsync -r {self.local_dir} {self.remote}`."
        )

    def _list_remote(self) -> dict[str, storage.Blob]:
        """Remote objects by relative path (one request per page of 1000); refreshes the record's generations."""
        found: dict[str, storage.Blob] = {}
        with gcs_errors(self.remote, "list"):
            listing = self.client.list_blobs(
                self._bucket(), prefix=self._prefix, retry=self._retry(), timeout=REQUEST_TIMEOUT_S
            )
            for page in listing.pages:
                self._count()
                for blob in page:
                    rel = blob.name[len(self._prefix) :]
                    if rel and not rel.endswith("/") and rel != LEASE_NAME:
                        found[rel] = blob
        self._remote = {rel: blob.generation for rel, blob in found.items()}
        return found

    # -- the record of what was synced ---------------------------------------------------------------

    def _load_state(self) -> None:
        """This mirror's record from an earlier process; none (or another output's) means: the bucket decides."""
        if not self._state_path.is_file():
            return
        try:
            state = json.loads(self._state_path.read_text(encoding="utf-8"))
            if state.get("remote") != self.remote:
                return
            self._synced = {rel: (int(key[0]), int(key[1])) for rel, key in state["synced"].items()}
            self._remote = dict(state["generations"])
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            logger.warning("Ignoring %s (unreadable): the bucket's version of every file decides", self._state_path)
            self._synced, self._remote = {}, {}

    def _save_state(self) -> None:
        write_json(self._state_path, {"remote": self.remote, "synced": self._synced, "generations": self._remote})

    def _record(self, rel: str, key: StatKey, generation: int | None) -> None:
        self._synced[rel] = key
        self._remote[rel] = generation

    def _forget(self, rel: str, *, remote: bool) -> None:
        self._synced.pop(rel, None)
        if remote:
            self._remote.pop(rel, None)

    # -- the lease -----------------------------------------------------------------------------------

    def acquire(self, job: str | None, take_over: bool = False) -> None:
        """Hold the output's lease (job/lease.py) before writing anything; renewed at every push, released by
        close(). JobError (exit 2) when another live job holds it."""
        holder = Holder.this_process(job, lease_ttl(self.interval_s))
        lease = OutputLease(self._bucket(), self._prefix + LEASE_NAME, self.remote, holder, self._retry(),
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
            seen = dict(self._remote)  # the bucket as this mirror last saw it (the listing replaces it)
            remote = {rel: blob for rel, blob in self._list_remote().items()
                      if not is_in_progress(rel) and self._local_path(rel) is not None}
            local = set(self._walk())
            states = {rel: self._state(rel, remote.get(rel), seen) for rel in sorted(remote.keys() | local)}
            indexes = [rel for rel in remote if is_index(rel)]
            failures = self._download_many([(rel, remote[rel]) for rel in indexes], into_memory=True)
            if failures:
                raise self._pull_failure(failures, len(indexes))
            remote_indexes = {rel: self._fetched.pop(rel).decode("utf-8", "replace") for rel in indexes}
            local_indexes = {rel: (self.local_dir / rel).read_text(encoding="utf-8", errors="replace")
                             for rel in local if is_index(rel)}
            plan = plan_pull(states, remote_indexes, local_indexes)
            for rel in plan.removes:
                (self.local_dir / rel).unlink(missing_ok=True)
                self._forget(rel, remote=states[rel] is LocalState.GONE)
            for rel in plan.kept:
                logger.info("Keeping %s: this mirror's newer version (the next push uploads it)", self.local_dir / rel)
            failures = self._download_many([(rel, remote[rel]) for rel in plan.downloads])
            if not failures:  # an index file pointing at missing data would break a restore
                failures = self._download_many([(rel, remote[rel]) for rel in plan.markers])
            todo = len(plan.downloads) + len(plan.markers)
            self._save_state()
            logger.info(
                "Pulled %d file(s) from %s into %s in %.1f s (%d not needed: older checkpoints)",
                todo - len(failures), self.remote, self.local_dir, time.monotonic() - start, len(plan.skipped),
            )
            if failures:
                raise self._pull_failure(failures, todo)
            return todo

    def _pull_failure(self, failures: list[tuple[str, BaseException]], total: int) -> StorageError:
        rel, exc = failures[0]
        return StorageError(
            f"Could not download {len(failures)} of {total} file(s) from {self.remote} into "
            f"{self.local_dir} (first: {rel}: {describe_error(exc)}): rerun to fetch only what is missing."
        )

    def _state(self, rel: str, blob: storage.Blob | None, seen: dict[str, int | None]) -> LocalState:
        """How the mirror's `rel` compares with the bucket's object (or, for a file only here, with the record;
        `seen`: the bucket's generations as this mirror last saw them)."""
        path = self.local_dir / rel
        key = _stat_key(path) if path.is_file() else None
        recorded = self._synced.get(rel)
        if blob is None:
            known = key is not None and key == recorded and rel in seen
            return LocalState.GONE if known else LocalState.UNPUBLISHED
        if key is None:
            return LocalState.MISSING
        unchanged = rel in seen and seen[rel] == blob.generation
        if (key == recorded and unchanged) or checksum_mismatch(path, blob) is None:
            self._record(rel, key, blob.generation)
            return LocalState.SAME
        return LocalState.OURS if recorded is not None and unchanged else LocalState.OTHER

    def _local_path(self, rel: str) -> Path | None:
        path = safe_relpath(rel)
        if path is None:
            logger.warning("Skipping %s: unsafe relative path", self._uri(rel))
            return None
        return self.local_dir.joinpath(*path.parts)

    def _download_many(
        self, items: list[tuple[str, storage.Blob]], *, into_memory: bool = False
    ) -> list[tuple[str, BaseException]]:
        """Download `items` into the mirror (and the record), or with `into_memory` into `self._fetched`."""
        failures: list[tuple[str, BaseException]] = []
        if not items:
            return failures
        retry = self._retry()

        def one(rel: str, blob: storage.Blob) -> StatKey | None:
            self._count()
            if into_memory:
                with gcs_errors(self._uri(rel), "download"):
                    self._fetched[rel] = blob.download_as_bytes(retry=retry, timeout=REQUEST_TIMEOUT_S)
                return None
            path = self.local_dir.joinpath(*rel.split("/"))
            download_blob(blob, path, retry=retry)
            return _stat_key(path)

        with ThreadPoolExecutor(max_workers=min(self._workers, len(items))) as pool:
            futures = [(rel, blob, pool.submit(one, rel, blob)) for rel, blob in items]
            for rel, blob, future in futures:
                exc = future.exception()
                if exc is not None:
                    failures.append((rel, exc))
                elif (key := future.result()) is not None:
                    self._record(rel, key, blob.generation)
        return failures

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
            for rel in [rel for rel in self._synced if rel.startswith(prefix)]:
                self._forget(rel, remote=True)
            self._save_state()
            if ordered:
                logger.info("Deleted %d object(s) under %s%s", len(ordered), self.remote, prefix)
            return len(ordered)

    def _delete(self, rel: str, *, strict: bool) -> None:
        """Delete one object (already gone is fine); `strict`: a failure raises, else it is retried later."""
        self._count()
        try:
            with gcs_errors(self._uri(rel), "delete"):
                self._bucket().blob(self._prefix + rel).delete(retry=self._retry(), timeout=REQUEST_TIMEOUT_S)
        except StorageError as err:
            if not isinstance(err.__cause__, NotFound):
                if strict:
                    raise
                logger.warning("Could not delete %s (retried at the next push): %s", self._uri(rel), err)
                return
        self._forget(rel, remote=True)

    # -- push ----------------------------------------------------------------------------------------

    def push(self) -> SyncStats:
        """Upload what changed since the last push, in job/syncplan.py's order, and delete the bucket's files of
        checkpoints no index names any more. Raises StorageError (LeaseLost when another job took the output)."""
        with self._lock:
            start = time.monotonic()
            requests_before = self._requests
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
            unsure = [rel for rel in changed if rel not in self._synced]
            if unsure:
                try:
                    self._drop_identical_remote(changed, unsure)
                except StorageError as exc:  # only an optimisation: upload them all instead
                    logger.warning("Could not compare with %s, uploading everything: %s", self.remote, exc)
            snapshots = {rel: (key, data) for rel, key, data in markers if rel in changed}
            indexes = {rel: data.decode("utf-8", "replace") for rel, (_, data) in snapshots.items() if is_index(rel)}
            plan = plan_push(changed.keys(), local | snapshots.keys(), self._remote.keys(), indexes)
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
            self._save_state()
            stats.requests = self._requests - requests_before
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
        self, unit: UnitPush, snapshots: dict[str, tuple[StatKey, bytes]],
        failures: list[tuple[str, BaseException]], stats: SyncStats,
    ) -> tuple[list[tuple[str, BaseException]], bool]:
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
                key = _stat_key(self.local_dir / rel)
            except FileNotFoundError:
                continue  # deleted since the walk (e.g. CheckpointManager max_to_keep)
            if self._synced.get(rel) != key:
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
                self._record(rel, changed.pop(rel), blob.generation)

    def _upload_many(
        self, rels: list[str], stats: SyncStats, vanished: list[str] | None = None
    ) -> list[tuple[str, BaseException]]:
        failures: list[tuple[str, BaseException]] = []
        if not rels:
            return failures
        with ThreadPoolExecutor(max_workers=min(self._workers, len(rels))) as pool:
            futures = [(rel, pool.submit(self._upload_file, rel)) for rel in rels]
            for rel, future in futures:
                exc = future.exception()
                if exc is not None:
                    failures.append((rel, exc))
                elif (result := future.result()) is not None:
                    self._record_upload(rel, *result, stats)
                elif vanished is not None:
                    vanished.append(rel)
        return failures

    def _record_upload(self, rel: str, key: StatKey, generation: int | None, stats: SyncStats) -> None:
        self._record(rel, key, generation)
        stats.files_uploaded += 1
        stats.bytes_uploaded += key[0]

    def _upload_file(
        self, rel: str, data: bytes | None = None, key: StatKey | None = None
    ) -> tuple[StatKey, int | None] | None:
        """Upload one file (or the given snapshot of it); returns the stat it was taken at and the object's
        generation, None if the file is gone."""
        path = self.local_dir / rel
        blob = self._bucket().blob(self._prefix + rel)
        content_type = mimetypes.guess_type(rel)[0] or DEFAULT_CONTENT_TYPE
        retry = self._retry()
        try:
            if data is None:
                key = _stat_key(path)  # taken before reading: a later change shows up at the next push
                self._count()
                upload_restarting(self._uri(rel), lambda: blob.upload_from_filename(
                    str(path), content_type=content_type, retry=retry, timeout=REQUEST_TIMEOUT_S))
            else:
                self._count()
                upload_restarting(self._uri(rel), lambda: blob.upload_from_string(
                    data, content_type=content_type, retry=retry, timeout=REQUEST_TIMEOUT_S))
        except FileNotFoundError:
            logger.debug("%s vanished before upload; skipping", path)
            return None
        if key is None:
            return None
        return key, blob.generation

    def _snapshot(self, rels: Iterable[str]) -> list[Snapshot]:
        """(rel, stat, contents) of each file now: the version uploaded, whatever happens to it meanwhile."""
        snapshots: list[Snapshot] = []
        for rel in rels:
            try:
                key = _stat_key(self.local_dir / rel)
                snapshots.append((rel, key, (self.local_dir / rel).read_bytes()))
            except FileNotFoundError:
                continue
        return snapshots

    def _upload_snapshots(self, snapshots: list[Snapshot], stats: SyncStats) -> list[tuple[str, BaseException]]:
        failures: list[tuple[str, BaseException]] = []
        for rel, key, data in snapshots:
            try:
                result = self._upload_file(rel, data=data, key=key)
            except Exception as exc:  # noqa: BLE001 - collected and reported by push()
                failures.append((rel, exc))
            else:
                if result is not None:
                    self._record_upload(rel, *result, stats)
        return failures

    # -- background thread ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start a daemon thread that calls push() every interval_s (failures are logged and retried)."""
        if self._closed_stats is not None:
            raise RuntimeError(f"OutputSync for {self.remote} is closed")
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="output-sync", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.push()
            except JobError as exc:  # StorageError, or LeaseLost: another job took the output over
                logger.warning("Periodic sync failed, will retry in %.0f s: %s", self.interval_s, exc)
            except Exception:
                logger.exception("Periodic sync to %s crashed; will retry", self.remote)

    def close(self) -> SyncStats:
        """Stop the thread and do a final push; later calls return the same stats."""
        if self._closed_stats is not None:
            return self._closed_stats
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()  # lets an in-flight push finish (the lock would serialise us anyway)
        try:
            stats = self.push()
        finally:
            self.release()
        self._closed_stats = stats
        if self._owns_client and self._client is not None:
            self._client.close()  # releases pooled connections
            self._client = None
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


def _stat_key(path: Path) -> StatKey:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


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
