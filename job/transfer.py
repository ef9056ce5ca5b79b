"""Objects under one gs:// prefix: the client (made on first use), the retry policy with a count of the requests
issued, listing, deleting, and parallel uploads and downloads whose failures are collected, not raised.

What moves, and in which order, is job/sync.py's (with job/syncplan.py); job/gcs.py holds the client, the retry
policy, one-sentence errors, checksums, resumable-upload restarts and the verified download used here.
"""

from __future__ import annotations

import logging
import mimetypes
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from google.api_core.exceptions import NotFound
from google.api_core.retry import Retry
from google.cloud import storage

from job.errors import StorageError
from job.gcs import (
    DEFAULT_RETRY_DEADLINE_S,
    REQUEST_TIMEOUT_S,
    GcsUri,
    download_blob,
    gcs_errors,
    make_client,
    make_retry,
    upload_restarting,
)

__all__ = ["TRANSFER_WORKERS", "Failure", "PrefixObjects", "Snapshot", "StatKey", "Uploaded", "stat_key"]

logger = logging.getLogger(__name__)

TRANSFER_WORKERS = 8  # parallel uploads/downloads (and the client's connection pool)
DEFAULT_CONTENT_TYPE = "application/octet-stream"

StatKey = tuple[int, int]  # (size, mtime_ns) of a local file
Snapshot = tuple[str, StatKey, bytes]  # (rel, stat before reading, contents)
Failure = tuple[str, BaseException]  # (rel, why it did not move)
Uploaded = Callable[[str, StatKey, int | None], None]  # (rel, stat uploaded, the object's generation)
Downloaded = Callable[[str, StatKey, storage.Blob], None]  # (rel, stat of the file written, the object)
T = TypeVar("T")


def stat_key(path: Path) -> StatKey:
    """`path`'s (size, mtime_ns): a change to the file changes it."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class PrefixObjects:
    """The objects under `remote` (gs://BUCKET/PREFIX/), named by their path relative to it."""

    def __init__(
        self,
        remote: str,
        *,
        client: storage.Client | None = None,
        retry_deadline_s: float = DEFAULT_RETRY_DEADLINE_S,
        workers: int = TRANSFER_WORKERS,
    ) -> None:
        uri = GcsUri.parse(remote)
        self.bucket_name = uri.bucket
        self.prefix = uri.name if not uri.name or uri.name.endswith("/") else uri.name + "/"
        self.remote = f"gs://{uri.bucket}/{self.prefix}"
        self.workers = max(1, workers)
        self._client = client
        self._owns_client = client is None
        self._retry_deadline_s = retry_deadline_s
        self._count_lock = threading.Lock()
        self.requests = 0  # HTTP operations issued, retries included

    @property
    def client(self) -> storage.Client:
        """The GCS client (made on first use)."""
        if self._client is None:
            self._client = make_client(pool_size=self.workers)
        return self._client

    def bucket(self) -> storage.Bucket:
        return self.client.bucket(self.bucket_name)

    def uri(self, rel: str) -> str:
        return f"{self.remote}{rel}"

    def count(self, _exc: Exception | None = None) -> None:
        """Count one request (also the retry policy's hook: each retry counts)."""
        with self._count_lock:
            self.requests += 1

    def retry(self) -> Retry:
        """The retry policy, counting each retry as a request."""
        return make_retry(self._retry_deadline_s, on_error=self.count)

    def close(self) -> None:
        """Close the client this made (its pooled connections); one passed in is the caller's."""
        if self._owns_client and self._client is not None:
            self._client.close()
            self._client = None

    # -- one object ----------------------------------------------------------------------------------

    def list(self) -> dict[str, storage.Blob]:
        """Objects by relative path, folder placeholders left out (one request per page of 1000)."""
        found: dict[str, storage.Blob] = {}
        with gcs_errors(self.remote, "list"):
            listing = self.client.list_blobs(
                self.bucket(), prefix=self.prefix, retry=self.retry(), timeout=REQUEST_TIMEOUT_S
            )
            for page in listing.pages:
                self.count()
                for blob in page:
                    rel = blob.name[len(self.prefix) :]
                    if rel and not rel.endswith("/"):
                        found[rel] = blob
        return found

    def delete(self, rel: str) -> None:
        """Delete one object; already gone is fine. StorageError otherwise."""
        self.count()
        try:
            with gcs_errors(self.uri(rel), "delete"):
                self.bucket().blob(self.prefix + rel).delete(retry=self.retry(), timeout=REQUEST_TIMEOUT_S)
        except StorageError as err:
            if not isinstance(err.__cause__, NotFound):
                raise

    def upload_file(self, rel: str, path: Path) -> tuple[StatKey, int | None] | None:
        """Upload the file at `path` as `rel`; returns the stat it was taken at and the object's generation,
        None if the file is gone."""
        try:
            key = stat_key(path)  # taken before reading: a later change shows up at the next push
            generation = self._put(rel, lambda blob, **kwargs: blob.upload_from_filename(str(path), **kwargs))
        except FileNotFoundError:
            logger.debug("%s vanished before upload; skipping", path)
            return None
        return key, generation

    def upload_bytes(self, rel: str, data: bytes) -> int | None:
        """Upload `data` (a snapshot of a file) as `rel`; returns the object's generation."""
        return self._put(rel, lambda blob, **kwargs: blob.upload_from_string(data, **kwargs))

    def _put(self, rel: str, send: Callable[..., None]) -> int | None:
        blob = self.bucket().blob(self.prefix + rel)
        content_type = mimetypes.guess_type(rel)[0] or DEFAULT_CONTENT_TYPE
        retry = self.retry()
        self.count()
        upload_restarting(
            self.uri(rel), lambda: send(blob, content_type=content_type, retry=retry, timeout=REQUEST_TIMEOUT_S)
        )
        return blob.generation

    # -- many, in parallel ---------------------------------------------------------------------------

    def upload_files(
        self, local_dir: Path, rels: list[str], done: Uploaded, vanished: list[str] | None = None
    ) -> list[Failure]:
        """Upload `local_dir`'s files `rels` in parallel: `done` is called for each uploaded file (in `rels`'
        order), a file gone meanwhile goes to `vanished`; returns the failures."""
        failures: list[Failure] = []
        if not rels:
            return failures
        with ThreadPoolExecutor(max_workers=min(self.workers, len(rels))) as pool:
            futures = [(rel, pool.submit(self.upload_file, rel, local_dir / rel)) for rel in rels]
            for rel, future in futures:
                exc = future.exception()
                if exc is not None:
                    failures.append((rel, exc))
                elif (result := future.result()) is not None:
                    done(rel, *result)
                elif vanished is not None:
                    vanished.append(rel)
        return failures

    def upload_snapshots(self, snapshots: list[Snapshot], done: Uploaded) -> list[Failure]:
        """Upload each snapshot's contents, one after the other; `done` is called for each; returns the failures."""
        failures: list[Failure] = []
        for rel, key, data in snapshots:
            try:
                generation = self.upload_bytes(rel, data)
            except Exception as exc:  # noqa: BLE001 - collected and reported by the caller
                failures.append((rel, exc))
            else:
                done(rel, key, generation)
        return failures

    def download_files(
        self, local_dir: Path, items: list[tuple[str, storage.Blob]], done: Downloaded
    ) -> list[Failure]:
        """Download `items` (rel, object) into `local_dir` in parallel (verified, job/gcs.py); `done` is called
        for each file written (in `items`' order); returns the failures."""
        retry = self.retry()

        def one(rel: str, blob: storage.Blob) -> StatKey:
            self.count()
            path = local_dir.joinpath(*rel.split("/"))
            download_blob(blob, path, retry=retry)
            return stat_key(path)

        failures: list[Failure] = []
        for rel, blob, result in self._parallel(items, one):
            if isinstance(result, BaseException):
                failures.append((rel, result))
            else:
                done(rel, result, blob)
        return failures

    def fetch(self, items: list[tuple[str, storage.Blob]]) -> tuple[dict[str, bytes], list[Failure]]:
        """The contents of `items` (rel, object), read into memory in parallel; and the failures."""
        retry = self.retry()

        def one(rel: str, blob: storage.Blob) -> bytes:
            self.count()
            with gcs_errors(self.uri(rel), "download"):
                return blob.download_as_bytes(retry=retry, timeout=REQUEST_TIMEOUT_S)

        fetched: dict[str, bytes] = {}
        failures: list[Failure] = []
        for rel, _, result in self._parallel(items, one):
            if isinstance(result, BaseException):
                failures.append((rel, result))
            else:
                fetched[rel] = result
        return fetched, failures

    def _parallel(
        self, items: list[tuple[str, storage.Blob]], one: Callable[[str, storage.Blob], T]
    ) -> Iterator[tuple[str, storage.Blob, T | BaseException]]:
        """`one(rel, blob)` for each item on up to `workers` threads: each result or exception, in order, as
        it is ready."""
        if not items:
            return
        with ThreadPoolExecutor(max_workers=min(self.workers, len(items))) as pool:
            futures = [(rel, blob, pool.submit(one, rel, blob)) for rel, blob in items]
            for rel, blob, future in futures:
                exc = future.exception()
                yield rel, blob, (exc if exc is not None else future.result())
