"""Artifacts out: mirror a local run directory to a gs:// prefix (periodic push, final push, resume pull).

Readers of the bucket never see a half-written checkpoint: `checkpoint` index files and completion
markers are uploaded last, and only after every other file in their directory made it.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
import re
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Self

from google.cloud import storage

from job.errors import JobError, StorageError
from job.files import TEMP_PREFIX
from job.storage import (
    CACHE_KEY_CHARS,
    DEFAULT_RETRY_DEADLINE_S,
    REQUEST_TIMEOUT_S,
    GcsUri,
    checksum_mismatch,
    describe_error,
    download_blob,
    gcs_errors,
    make_client,
    make_retry,
)

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 60.0
SYNC_WORKERS = 8
MAX_SETTLE_ROUNDS = 3
DEFAULT_CONTENT_TYPE = "application/octet-stream"

# Written last in their directory: TF CheckpointManager's index file (it names the data files beside it).
INDEX_MARKER_NAMES = frozenset({"checkpoint"})
# Written last of all: a stage's completion marker vouches for files anywhere in the run (its exported
# model, its checkpoints), so it goes up only after everything else in the push went up.
COMPLETION_MARKER_NAMES = frozenset({"DONE", "_SUCCESS", "done.json"})
COMPLETION_MARKER_SUFFIXES = (".done", ".complete.json")

# Being written right now: never uploaded (they get renamed to their final name when complete).
TEMP_SUFFIXES = (".tmp", ".partial")
TEMP_PREFIXES = ("tmp", TEMP_PREFIX)  # TEMP_PREFIX: job.files.atomic_path's names
TF_ATOMIC_WRITE_RE = re.compile(r"\.tmp[0-9a-f]{32}$")  # file_io.atomic_write_string_to_file
TF_SHARDED_TEMP_DIR_SUFFIX = "_temp"  # sharded saves write to <prefix>_temp/part-* first

StatKey = tuple[int, int]  # (size, mtime_ns)


def is_completion_marker(rel: str) -> bool:
    """True for files that must be uploaded after every other file of the run."""
    name = PurePosixPath(rel).name
    return name in COMPLETION_MARKER_NAMES or name.endswith(COMPLETION_MARKER_SUFFIXES)


def is_marker(rel: str) -> bool:
    """True for files that must be uploaded after (and downloaded after) the data they point to."""
    return PurePosixPath(rel).name in INDEX_MARKER_NAMES or is_completion_marker(rel)


def is_in_progress(rel: str) -> bool:
    """True for temp files (and files inside TF temp dirs) that are still being written."""
    parts = PurePosixPath(rel).parts
    name = parts[-1]
    if name.endswith(TEMP_SUFFIXES) or name.startswith(TEMP_PREFIXES) or TF_ATOMIC_WRITE_RE.search(name):
        return True
    return any(_is_temp_dir(part) for part in parts[:-1])


def _is_temp_dir(name: str) -> bool:
    return name.endswith(TF_SHARDED_TEMP_DIR_SUFFIX) or name.startswith(TEMP_PREFIXES)


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
        self._synced: dict[str, StatKey] = {}
        self._requests = 0
        self._closed_stats: SyncStats | None = None
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

    def _push_failure(self, failures: list[tuple[str, BaseException]], total: int) -> StorageError:
        rel, exc = failures[0]
        return StorageError(
            f"Could not upload {len(failures)} of {total} file(s) to {self.remote} "
            f"(first: {rel}: {describe_error(exc)}); the local copy is kept at {self.local_dir} and nothing "
            f"was deleted: rerun, or copy it with `gcloud storage rsync -r {self.local_dir} {self.remote}`."
        )

    def _list_remote(self) -> dict[str, storage.Blob]:
        """Remote objects by relative path (one request per page of 1000)."""
        found: dict[str, storage.Blob] = {}
        with gcs_errors(self.remote, "list"):
            listing = self.client.list_blobs(
                self._bucket(),
                prefix=self._prefix,
                retry=make_retry(self._retry_deadline_s, on_error=self._count),
                timeout=REQUEST_TIMEOUT_S,
            )
            for page in listing.pages:
                self._count()
                for blob in page:
                    rel = blob.name[len(self._prefix) :]
                    if rel and not rel.endswith("/"):
                        found[rel] = blob
        return found

    # -- pull ----------------------------------------------------------------------------------------

    def pull(self) -> int:
        """Download remote files missing or different locally (resume on a new VM); returns files pulled."""
        with self._lock:
            start = time.monotonic()
            remote = self._list_remote()
            todo: list[tuple[str, storage.Blob]] = []
            for rel, blob in sorted(remote.items()):
                path = self._local_path(rel)
                if path is None or is_in_progress(rel):
                    continue
                if not path.is_file():
                    todo.append((rel, blob))
                elif checksum_mismatch(path, blob) is None:
                    self._synced[rel] = _stat_key(path)
                elif blob.updated is not None and path.stat().st_mtime > blob.updated.timestamp():
                    logger.info("Keeping %s: newer than %s (the next push uploads it)", path, self._uri(rel))
                else:
                    todo.append((rel, blob))
            data = [t for t in todo if not is_marker(t[0])]
            markers = [t for t in todo if is_marker(t[0])]
            failures = self._download_many(data)
            if not failures:  # an index file pointing at missing data would break a restore
                failures = self._download_many(markers)
            pulled = len(todo) - len(failures)
            logger.info(
                "Pulled %d file(s) from %s into %s in %.1f s",
                pulled,
                self.remote,
                self.local_dir,
                time.monotonic() - start,
            )
            if failures:
                rel, exc = failures[0]
                raise StorageError(
                    f"Could not download {len(failures)} of {len(todo)} file(s) from {self.remote} into "
                    f"{self.local_dir} (first: {rel}: {describe_error(exc)}): "
                    "rerun to fetch only what is missing."
                )
            return pulled

    def _local_path(self, rel: str) -> Path | None:
        parts = rel.split("/")
        if any(part in ("", ".", "..") for part in parts):
            logger.warning("Skipping %s: unsafe relative path", self._uri(rel))
            return None
        return self.local_dir.joinpath(*parts)

    def _download_many(self, items: list[tuple[str, storage.Blob]]) -> list[tuple[str, BaseException]]:
        failures: list[tuple[str, BaseException]] = []
        if not items:
            return failures
        retry = make_retry(self._retry_deadline_s, on_error=self._count)

        def one(rel: str, blob: storage.Blob) -> StatKey:
            path = self.local_dir.joinpath(*rel.split("/"))
            self._count()
            download_blob(blob, path, retry=retry)
            return _stat_key(path)

        with ThreadPoolExecutor(max_workers=min(self._workers, len(items))) as pool:
            futures = [(rel, pool.submit(one, rel, blob)) for rel, blob in items]
            for rel, future in futures:
                exc = future.exception()
                if exc is None:
                    self._synced[rel] = future.result()
                else:
                    failures.append((rel, exc))
        return failures

    # -- push ----------------------------------------------------------------------------------------

    def push(self) -> SyncStats:
        """Upload files changed since the last push; markers last, per directory. Raises StorageError."""
        with self._lock:
            start = time.monotonic()
            requests_before = self._requests
            stats = SyncStats()
            # Completion markers are read first: whatever they vouch for was written before them, so
            # it is in the walk that follows.
            completions = self._snapshot(sorted(self._changed(r for r in self._walk() if is_completion_marker(r))))
            changed = self._changed(self._walk())
            # The snapshots' stats, so that the remote comparison below skips markers already up there.
            changed.update((rel, key) for rel, key, _ in completions)
            if changed:
                _ = self.client  # credential problems surface here, with their own fix
            unsure = [rel for rel in changed if rel not in self._synced]
            if unsure:
                try:
                    self._drop_identical_remote(changed, unsure)
                except StorageError as exc:  # only an optimisation: upload them all instead
                    logger.warning("Could not compare with %s, uploading everything: %s", self.remote, exc)
            completions = [snapshot for snapshot in completions if snapshot[0] in changed]
            changed = {rel: key for rel, key in changed.items() if not is_completion_marker(rel)}
            data = [rel for rel in changed if not is_marker(rel)]
            markers: dict[str, list[str]] = defaultdict(list)
            for rel in changed:
                if is_marker(rel):
                    markers[_parent(rel)].append(rel)
            failures = self._upload_many(data, stats)
            for directory, rels in sorted(markers.items()):
                failures += self._push_markers(directory, rels, failures, stats)
            if completions and failures:
                logger.warning(
                    "Not uploading %s: %d other file(s) failed to upload", [c[0] for c in completions], len(failures)
                )
            elif completions:
                failures += self._upload_snapshots(completions, stats)
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

    def _walk(self, directory: str | None = None) -> Iterable[str]:
        """Relative paths of finished files (everything, or just the files directly in `directory`)."""
        if directory is not None:
            base = self.local_dir / directory if directory else self.local_dir
            try:
                entries = [e.name for e in os.scandir(base) if e.is_file()]
            except FileNotFoundError:
                return []
            rels = [f"{directory}/{name}" if directory else name for name in entries]
            return [rel for rel in rels if not is_in_progress(rel)]
        found: list[str] = []
        for root, dirnames, filenames in os.walk(self.local_dir):
            rel_root = Path(root).relative_to(self.local_dir).as_posix()
            rel_root = "" if rel_root == "." else rel_root
            dirnames[:] = [d for d in dirnames if not _is_temp_dir(d)]
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
                self._synced[rel] = changed.pop(rel)

    def _upload_many(self, rels: list[str], stats: SyncStats) -> list[tuple[str, BaseException]]:
        failures: list[tuple[str, BaseException]] = []
        if not rels:
            return failures
        with ThreadPoolExecutor(max_workers=min(self._workers, len(rels))) as pool:
            futures = [(rel, pool.submit(self._upload_file, rel)) for rel in rels]
            for rel, future in futures:
                exc = future.exception()
                if exc is not None:
                    failures.append((rel, exc))
                elif (key := future.result()) is not None:
                    self._record_upload(rel, key, stats)
        return failures

    def _record_upload(self, rel: str, key: StatKey, stats: SyncStats) -> None:
        self._synced[rel] = key
        stats.files_uploaded += 1
        stats.bytes_uploaded += key[0]

    def _upload_file(self, rel: str, data: bytes | None = None, key: StatKey | None = None) -> StatKey | None:
        """Upload one file (or the given snapshot of it); returns the stat it was taken at, None if gone."""
        path = self.local_dir / rel
        blob = self._bucket().blob(self._prefix + rel)
        content_type = mimetypes.guess_type(rel)[0] or DEFAULT_CONTENT_TYPE
        retry = make_retry(self._retry_deadline_s, on_error=self._count)
        try:
            if data is None:
                key = _stat_key(path)  # taken before reading: a later change shows up at the next push
                self._count()
                with gcs_errors(self._uri(rel), "upload"):
                    blob.upload_from_filename(
                        str(path), content_type=content_type, retry=retry, timeout=REQUEST_TIMEOUT_S
                    )
            else:
                self._count()
                with gcs_errors(self._uri(rel), "upload"):
                    blob.upload_from_string(data, content_type=content_type, retry=retry, timeout=REQUEST_TIMEOUT_S)
        except FileNotFoundError:
            logger.debug("%s vanished before upload; skipping", path)
            return None
        return key

    def _push_markers(
        self, directory: str, rels: list[str], failures: list[tuple[str, BaseException]], stats: SyncStats
    ) -> list[tuple[str, BaseException]]:
        """Snapshot the markers, upload anything new in their directory, then the markers themselves."""
        if any(_parent(rel) == directory for rel, _ in failures):
            logger.warning("Not uploading %s: other files in %s/ failed to upload", rels, directory or ".")
            return []
        snapshots = self._snapshot(sorted(rels))
        # TF writes data/index files before it rewrites `checkpoint`: whatever the snapshot points to
        # exists now, so upload the directory's files that changed since our first scan.
        new_failures: list[tuple[str, BaseException]] = []
        for _ in range(MAX_SETTLE_ROUNDS):
            pending = [rel for rel in self._changed(self._walk(directory)) if not is_marker(rel)]
            if not pending:
                break
            new_failures += self._upload_many(pending, stats)
            if new_failures:
                logger.warning("Not uploading %s: other files in %s/ failed to upload", rels, directory or ".")
                return new_failures
        return self._upload_snapshots(snapshots, stats)

    def _snapshot(self, rels: Iterable[str]) -> list[tuple[str, StatKey, bytes]]:
        """(rel, stat, contents) of each file now: the version uploaded, whatever happens to it meanwhile."""
        snapshots: list[tuple[str, StatKey, bytes]] = []
        for rel in rels:
            try:
                key = _stat_key(self.local_dir / rel)
                snapshots.append((rel, key, (self.local_dir / rel).read_bytes()))
            except FileNotFoundError:
                continue
        return snapshots

    def _upload_snapshots(
        self, snapshots: list[tuple[str, StatKey, bytes]], stats: SyncStats
    ) -> list[tuple[str, BaseException]]:
        failures: list[tuple[str, BaseException]] = []
        for rel, key, data in snapshots:
            try:
                self._upload_file(rel, data=data, key=key)
            except Exception as exc:  # noqa: BLE001 - collected and reported by push()
                failures.append((rel, exc))
            else:
                self._record_upload(rel, key, stats)
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
            except StorageError as exc:
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
        stats = self.push()
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


def _parent(rel: str) -> str:
    parent = PurePosixPath(rel).parent.as_posix()
    return "" if parent == "." else parent


def _stat_key(path: Path) -> StatKey:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def open_output(output: str, work_root: Path, interval_s: float = DEFAULT_INTERVAL_S,
                mirror: str = "") -> tuple[Path, OutputSync | None]:
    """Local output → (Path(output), None); gs://… → (work_root/<sha1(uri)[:16]><mirror>, an unstarted OutputSync).

    `mirror`: a suffix for a mirror of one's own (the other workers of a multi-worker job: only their pulls
    write into it, never the chief's training). The job writes to the returned directory. For gs://, call
    `pull()` to resume, `start()` for periodic pushes, and `close()` (or use it as a context manager) for
    the final push.
    """
    check_output_uri(output)
    if output.startswith("gs://"):
        key = hashlib.sha1(output.encode("utf-8")).hexdigest()[:CACHE_KEY_CHARS]
        local = Path(work_root) / f"{key}{mirror}"
        local.mkdir(parents=True, exist_ok=True)
        return local, OutputSync(output, local, interval_s=interval_s)
    return Path(output), None


def check_output_uri(output: str) -> None:
    """A JobError unless --output is a local path or a well-formed gs:// URI."""
    if output.startswith("gs://"):
        GcsUri.parse(output)
    elif "://" in output:
        raise JobError(f"{output} uses an unsupported scheme: pass a local directory or gs://BUCKET/PREFIX.")
