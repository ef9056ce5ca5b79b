"""Object storage, data in: fetch the dataset from a local path, gs:// or http(s):// into a local cache.

Also holds the Google Cloud Storage primitives (client, retry policy, verified downloads, checksums)
that `job.sync` reuses. This module must not import TensorFlow.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import urlparse

import google.auth
import google_crc32c
import requests
import urllib3
from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession
from google.cloud import storage
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

from job.errors import JobError, StorageError
from job.files import write_json

logger = logging.getLogger(__name__)

EMULATOR_ENV_VAR = "STORAGE_EMULATOR_HOST"
EMULATOR_PROJECT = "emulator-project"
GCS_SCOPES = ("https://www.googleapis.com/auth/devstorage.read_write",)
# google-cloud-storage 3.x fires a background bucket GET (storage.buckets.get) per client for tracing
# attributes; training accounts usually have object-only roles, so it just adds denied calls to the audit
# log (googleapis/google-cloud-python#17650). The library's only opt-out is this process-wide variable.
BUCKET_METADATA_OPT_OUT_ENV_VAR = "DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA"
CREDENTIALS_ENV_VAR = "GOOGLE_APPLICATION_CREDENTIALS"
CREDENTIALS_FIX = "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"

DEFAULT_RETRY_DEADLINE_S = 120.0
RETRY_INITIAL_DELAY_S = 1.0
RETRY_MAX_DELAY_S = 32.0
RETRY_MULTIPLIER = 2.0
REQUEST_TIMEOUT_S = 60.0
TRANSIENT_HTTP_STATUS = frozenset({408, 429, 500, 502, 503, 504})

DEFAULT_WORKERS = 32
CACHE_KEY_CHARS = 16
SIDECAR_SUFFIX = ".meta.json"
PARTIAL_SUFFIX = ".partial"
HASH_CHUNK_BYTES = 1 << 20
HTTP_CHUNK_BYTES = 1 << 20
DEFAULT_HTTP_NAME = "download"

MAX_CAUSE_DEPTH = 5
# A URL's query string (a signed URL's signature and expiry) never reaches a log, an error or a record on disk.
REDACTED_QUERY = "?<redacted>"
QUERY_RE = re.compile(r"\?[^\s'\"<>()]+")
MAX_REASON_CHARS = 200

PROGRESS_LOG_FRACTION = 0.10
PROGRESS_LOG_INTERVAL_S = 30.0

_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    api_exceptions.TooManyRequests,
    api_exceptions.InternalServerError,
    api_exceptions.BadGateway,
    api_exceptions.ServiceUnavailable,
    api_exceptions.GatewayTimeout,
    ConnectionError,
    TimeoutError,
    requests.exceptions.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.Timeout,
    http.client.BadStatusLine,
    http.client.IncompleteRead,
    http.client.ResponseNotReady,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.TimeoutError,
    urllib3.exceptions.PoolError,
)


# ---------------------------------------------------------------------------------------------------------
# Retry policy and client
# ---------------------------------------------------------------------------------------------------------


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it wraps: causes, contexts, urllib3's `reason`, exceptions among its args."""
    stack, seen = [exc], set()
    while stack and len(seen) < MAX_CAUSE_DEPTH * 4:
        current = stack.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]


def unreachable(exc: BaseException) -> str | None:
    """Why the server cannot be reached at all (its name does not resolve, or it refuses connections), else
    None. Retrying those only delays the error: they are not transient."""
    for cause in _causes(exc):
        if isinstance(cause, urllib3.exceptions.NameResolutionError | socket.gaierror):
            host = getattr(getattr(cause, "conn", None), "host", None)
            return f"host {host} does not resolve" if host else "the host name does not resolve"
        if isinstance(cause, ConnectionRefusedError):
            conn = next((getattr(c, "conn", None) for c in _causes(exc) if getattr(c, "conn", None)), None)
            where = f"{conn.host}:{conn.port}" if conn is not None else "the server"
            return f"{where} refused the connection"
    return None


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: 408/429/5xx, connection resets, timeouts, truncated bodies; not a host
    that does not resolve or refuses connections."""
    if unreachable(exc) is not None:
        return False
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return exc.code in TRANSIENT_HTTP_STATUS
    if isinstance(exc, InvalidResponse):
        return exc.response.status_code in TRANSIENT_HTTP_STATUS
    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        return exc.response.status_code in TRANSIENT_HTTP_STATUS
    if (
        isinstance(exc, auth_exceptions.TransportError)
        and exc.args
        and isinstance(exc.args[0], BaseException)
    ):
        return is_transient(exc.args[0])
    return False


def make_retry(
    deadline_s: float = DEFAULT_RETRY_DEADLINE_S,
    *,
    on_error: Callable[[Exception], Any] | None = None,
    initial_s: float | None = None,
) -> Retry:
    """Exponential-backoff retry for metadata calls, listings, downloads and uploads alike."""

    def _log_and_count(exc: Exception) -> None:
        logger.debug("Retrying after transient storage error: %s", redact(repr(exc)))
        if on_error is not None:
            on_error(exc)

    return Retry(
        predicate=is_transient,
        initial=RETRY_INITIAL_DELAY_S if initial_s is None else initial_s,
        maximum=RETRY_MAX_DELAY_S,
        multiplier=RETRY_MULTIPLIER,
        timeout=deadline_s,
        on_error=_log_and_count,
    )


def make_client(*, pool_size: int = DEFAULT_WORKERS) -> storage.Client:
    """The one place a GCS client is made: emulator (anonymous, fixed project) or Application Default Creds.

    `pool_size` sizes the HTTP connection pool for that many concurrent transfers.
    """
    os.environ.setdefault(BUCKET_METADATA_OPT_OUT_ENV_VAR, "true")  # a user's explicit setting wins
    if os.environ.get(EMULATOR_ENV_VAR):
        credentials: Any = AnonymousCredentials()
        project: str | None = EMULATOR_PROJECT
    else:
        try:
            credentials, project = google.auth.default(scopes=GCS_SCOPES)
        except auth_exceptions.DefaultCredentialsError as exc:
            key_file = os.environ.get(CREDENTIALS_ENV_VAR)
            if key_file:
                raise StorageError(
                    f"{CREDENTIALS_ENV_VAR}={key_file} could not be loaded ({describe_error(exc)}): "
                    "point it at a service-account key file, or unset it and run "
                    "`gcloud auth application-default login`."
                ) from exc
            raise StorageError(
                f"No Google Cloud credentials were found for Cloud Storage: {CREDENTIALS_FIX}."
            ) from exc
    session = AuthorizedSession(credentials)
    adapter = requests.adapters.HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    # project=None means "no project": fine for object reads/writes, which is all this job does.
    return storage.Client(project=project, credentials=credentials, _http=session)


# ---------------------------------------------------------------------------------------------------------
# URIs, errors, checksums
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GcsUri:
    """A parsed gs://bucket/name URI (name may be empty or end with '/')."""

    bucket: str
    name: str

    @classmethod
    def parse(cls, uri: str) -> GcsUri:
        """Parse gs://bucket[/name]; JobError when the bucket is missing."""
        if not uri.startswith("gs://"):
            raise JobError(f"{uri} is not a gs:// URI: write it as gs://BUCKET/PATH.")
        bucket, _, name = uri[len("gs://") :].partition("/")
        if not bucket:
            raise JobError(f"{uri} has no bucket name: write it as gs://BUCKET/PATH.")
        return cls(bucket, name)

    def __str__(self) -> str:
        return f"gs://{self.bucket}/{self.name}"


def cache_key(uri: str) -> str:
    """Stable short directory name for a URI."""
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()[:CACHE_KEY_CHARS]


def redact(text: str) -> str:
    """`text` with every URL query string (`?…`) replaced by `?<redacted>`."""
    return QUERY_RE.sub(REDACTED_QUERY, text)


class RedactingFilter(logging.Filter):
    """Redacts query strings in the records of a library logger (urllib3 logs each request's URL at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "?" in message:
            record.msg, record.args = redact(message), ()
        return True


logging.getLogger("urllib3.connectionpool").addFilter(RedactingFilter())


def describe_error(exc: BaseException) -> str:
    """A short reason for logs and messages: 'HTTP 503', 'ConnectionResetError: ...', unwrapping retries."""
    seen = 0
    while seen < MAX_CAUSE_DEPTH:
        seen += 1
        if isinstance(exc, api_exceptions.RetryError) and exc.cause is not None:
            exc = exc.cause
        elif isinstance(exc, StorageError) and exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            break
    if isinstance(exc, InvalidResponse):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return f"HTTP {exc.code} {exc.message}".strip()
    text = str(exc)
    text = text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def gcs_errors(
    uri: str, action: str, fix: str = "check the URI and your network, then rerun"
) -> Iterator[None]:
    """Turn google-cloud-storage exceptions into one-sentence StorageErrors naming `uri`."""
    def unreachable_host(reason: str) -> str:
        return f"Could not {action} {uri}: {reason}; check the URI, {EMULATOR_ENV_VAR} if set, and your network."

    with _unreachable_fails_fast(unreachable_host), _gcs_call_errors(uri, action, fix):
        yield


@contextlib.contextmanager
def _unreachable_fails_fast(message: Callable[[str], str]) -> Iterator[None]:
    """A host that does not resolve or refuses connections (retrying would not help): one StorageError."""
    try:
        yield
    except Exception as exc:
        cause = exc.__cause__ if isinstance(exc, StorageError) else exc
        if cause is None or (reason := unreachable(cause)) is None:
            raise
        raise StorageError(message(reason)) from cause


@contextlib.contextmanager
def _gcs_call_errors(uri: str, action: str, fix: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except api_exceptions.NotFound as exc:
        raise StorageError(f"{uri} does not exist: check the bucket and object name.") from exc
    except (api_exceptions.Forbidden, api_exceptions.Unauthorized) as exc:
        raise StorageError(
            f"Permission denied while trying to {action} {uri}: grant your account access to the bucket, "
            f"or {CREDENTIALS_FIX} for an account that has it."
        ) from exc
    except auth_exceptions.DefaultCredentialsError as exc:
        raise StorageError(f"No Google Cloud credentials to {action} {uri}: {CREDENTIALS_FIX}.") from exc
    except api_exceptions.RetryError as exc:
        raise StorageError(
            f"Could not {action} {uri}: still failing after retrying ({describe_error(exc)}); {fix}."
        ) from exc
    except DataCorruption as exc:
        raise StorageError(f"Checksum mismatch while trying to {action} {uri}: {fix}.") from exc
    except (api_exceptions.GoogleAPICallError, InvalidResponse, auth_exceptions.GoogleAuthError) as exc:
        raise StorageError(f"Could not {action} {uri} ({describe_error(exc)}): {fix}.") from exc
    except Exception as exc:
        if is_transient(exc):
            raise StorageError(f"Could not {action} {uri} ({describe_error(exc)}): {fix}.") from exc
        raise


@dataclass(frozen=True)
class FileChecksums:
    """Base64 digests in the format GCS reports them (blob.md5_hash / blob.crc32c)."""

    md5: str
    crc32c: str


def file_checksums(path: Path) -> FileChecksums:
    """md5 and crc32c of a local file in one pass."""
    md5 = hashlib.md5()
    crc = google_crc32c.Checksum()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK_BYTES):
            md5.update(chunk)
            crc.update(chunk)
    return FileChecksums(
        md5=base64.b64encode(md5.digest()).decode("ascii"),
        crc32c=base64.b64encode(crc.digest()).decode("ascii"),
    )


def checksum_mismatch(path: Path, blob: storage.Blob) -> str | None:
    """None when `path` has the blob's size and md5 (or crc32c for composite objects); else why not."""
    size = path.stat().st_size
    if blob.size is not None and size != int(blob.size):
        return f"size {size} != {blob.size}"
    if not blob.md5_hash and not blob.crc32c:
        return None
    sums = file_checksums(path)
    if blob.md5_hash:
        return None if sums.md5 == blob.md5_hash else f"md5 {sums.md5} != {blob.md5_hash}"
    return None if sums.crc32c == blob.crc32c else f"crc32c {sums.crc32c} != {blob.crc32c}"


def temp_path_for(dest: Path) -> Path:
    """A sibling temp name that job.sync skips and that never looks like a finished file."""
    return dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


VERSION_KEYS = ("generation", "etag", "last_modified", "size", "md5", "crc32c", "sha256")


def fetched_version(local: Path) -> dict[str, Any] | None:
    """What identifies the remote data behind `local` (a path fetch_dataset returned), from the record the
    download left beside it: the object's generation/etag/checksums, or a digest of a tree's manifest."""
    record = _read_json(local.with_name(local.name + SIDECAR_SUFFIX))
    if record is None:
        return None
    if "objects" in record:  # a gs:// tree: each object's generation and checksums
        objects = {rel: {k: meta.get(k) for k in VERSION_KEYS} for rel, meta in record["objects"].items()}
        digest = hashlib.sha1(json.dumps(objects, sort_keys=True).encode("utf-8")).hexdigest()
        return {"objects": len(objects), "manifest_sha1": digest}
    return {key: record[key] for key in VERSION_KEYS if record.get(key) is not None}


# ---------------------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------------------


class TransferProgress:
    """A tqdm bar on a TTY; otherwise a log line every ~10% or 30 s. Thread-safe; counts bytes and files."""

    def __init__(self, total_bytes: int | None, desc: str, total_files: int | None = None) -> None:
        self._total = total_bytes
        self._total_files = total_files
        self._desc = desc
        self._done = 0
        self._files = 0
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last_log = self._start
        self._next_fraction = PROGRESS_LOG_FRACTION
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, leave=False)

    def update(self, n: int) -> None:
        """Account for `n` more bytes."""
        with self._lock:
            self._done += n
            if self._bar is not None:
                self._bar.update(n)
            else:
                self._maybe_log()

    def file_done(self) -> None:
        """Account for one more finished file."""
        with self._lock:
            self._files += 1
            if self._bar is None:
                self._maybe_log()

    def _fraction(self) -> float:
        if self._total:
            return self._done / self._total
        return self._files / self._total_files if self._total_files else 0.0

    def _maybe_log(self) -> None:
        now = time.monotonic()
        fraction = self._fraction()
        if fraction < self._next_fraction and now - self._last_log < PROGRESS_LOG_INTERVAL_S:
            return
        while self._next_fraction <= fraction:
            self._next_fraction += PROGRESS_LOG_FRACTION
        self._last_log = now
        logger.info("%s: %s (%.0f%%)", self._desc, self._summary(), 100 * fraction)

    def _summary(self) -> str:
        total = f"/{self._total / 1e6:.1f}" if self._total else ""
        text = f"{self._done / 1e6:.1f}{total} MB"
        if self._total_files:
            text = f"{self._files}/{self._total_files} files, {text}"
        return text

    def close(self) -> None:
        """Finish the bar / log a summary."""
        if self._bar is not None:
            self._bar.close()
        logger.info("%s: %s in %.1f s", self._desc, self._summary(), time.monotonic() - self._start)


class _CountingWriter:
    """File wrapper that reports written bytes to a TransferProgress."""

    def __init__(self, fh: BinaryIO, progress: TransferProgress) -> None:
        self._fh = fh
        self._progress = progress

    def write(self, data: bytes) -> int:
        written = self._fh.write(data)
        self._progress.update(len(data))
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


# ---------------------------------------------------------------------------------------------------------
# Verified GCS download
# ---------------------------------------------------------------------------------------------------------


def download_blob(
    blob: storage.Blob,
    dest: Path,
    *,
    retry: Retry,
    progress: TransferProgress | None = None,
    timeout_s: float = REQUEST_TIMEOUT_S,
) -> None:
    """Download `blob` (metadata already loaded) to `dest` via a temp file; verify md5/crc32c, then rename.

    On a checksum mismatch the temp file is deleted and a StorageError names the object.
    """
    uri = f"gs://{blob.bucket.name}/{blob.name}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(dest)
    try:
        with gcs_errors(uri, "download"), open(tmp, "wb") as fh:
            target: Any = _CountingWriter(fh, progress) if progress is not None else fh
            # checksum=None: we verify the finished file against the metadata ourselves (below).
            blob.download_to_file(target, retry=retry, checksum=None, timeout=timeout_s)
        problem = checksum_mismatch(tmp, blob)
        if problem is not None:
            raise StorageError(
                f"{uri} failed verification after download ({problem}): the corrupt copy was deleted; "
                "rerun, and if it persists re-upload the object."
            )
        os.replace(tmp, dest)
        if progress is not None:
            progress.file_done()
    finally:
        tmp.unlink(missing_ok=True)


def _blob_meta(uri: str, blob: storage.Blob) -> dict[str, Any]:
    return {
        "uri": uri,
        "generation": blob.generation,
        "etag": blob.etag,
        "size": int(blob.size) if blob.size is not None else None,
        "md5": blob.md5_hash,
        "crc32c": blob.crc32c,
    }


def _same_object(recorded: dict[str, Any] | None, current: dict[str, Any]) -> bool:
    keys = ("generation", "etag", "size", "md5", "crc32c")
    return recorded is not None and all(recorded.get(k) == current[k] for k in keys)


def _is_current(
    dest: Path, blob: storage.Blob, recorded: dict[str, Any] | None, meta: dict[str, Any]
) -> bool:
    """True when the local copy matches the remote object (by recorded metadata, else by local checksum)."""
    if not dest.is_file() or (meta["size"] is not None and dest.stat().st_size != meta["size"]):
        return False
    if _same_object(recorded, meta):
        return True
    # No/old record but a same-size file (e.g. the run was killed before the sidecar was written): hash it.
    return checksum_mismatch(dest, blob) is None


# ---------------------------------------------------------------------------------------------------------
# fetch_dataset
# ---------------------------------------------------------------------------------------------------------


def fetch_dataset(
    uri: str,
    cache_dir: Path,
    sha256: str | None = None,
    *,
    retry_deadline_s: float = DEFAULT_RETRY_DEADLINE_S,
    workers: int = DEFAULT_WORKERS,
    client: storage.Client | None = None,
) -> Path:
    """Return a local path (a .zip or a directory holding/being tiny-imagenet-200/) for `uri`.

    `uri` is a local path, gs://bucket/file.zip, gs://bucket/prefix/ (extracted tree) or http(s)://.../x.zip.
    Remote data is cached under `cache_dir` and only downloaded again when the remote object changed.
    """
    scheme = urlparse(uri).scheme.lower()
    if sha256 and scheme not in ("http", "https"):
        raise JobError(f"data.sha256 is checked on https:// downloads only, and --data {redact(uri)} is not one: "
                       "remove data.sha256 (gs:// objects are verified against their md5/crc32c).")
    if scheme == "gs":
        return _fetch_gcs(uri, Path(cache_dir), retry_deadline_s, workers, client)
    if scheme in ("http", "https"):
        return _fetch_http(uri, Path(cache_dir), sha256, retry_deadline_s)
    if "://" in uri:
        raise JobError(
            f"{uri} uses an unsupported scheme: pass a local path, gs://, or https:// with --data."
        )
    path = Path(uri).expanduser()
    if not path.exists():
        raise JobError(f"{path} does not exist: check the path, or pass a gs:// or https:// URI with --data.")
    return path


def gcs_object_exists(uri: str, client: storage.Client | None = None) -> bool:
    """Whether gs://bucket/name is an object (False for a prefix or a missing object); StorageError on failure."""
    gcs = GcsUri.parse(uri)
    if not gcs.name or gcs.name.endswith("/"):
        return False
    if client is None:
        with contextlib.closing(make_client(pool_size=1)) as own_client:
            return gcs_object_exists(uri, own_client)
    with gcs_errors(uri, "read the metadata of"):
        blob = client.bucket(gcs.bucket).get_blob(gcs.name, retry=make_retry(), timeout=REQUEST_TIMEOUT_S)
    return blob is not None


def _fetch_gcs(
    uri: str, cache_dir: Path, retry_deadline_s: float, workers: int, client: storage.Client | None
) -> Path:
    gcs = GcsUri.parse(uri)
    if client is None:
        with contextlib.closing(make_client(pool_size=workers)) as own_client:
            return _fetch_gcs(uri, cache_dir, retry_deadline_s, workers, own_client)
    retry = make_retry(retry_deadline_s)
    bucket = client.bucket(gcs.bucket)
    blob = None
    if gcs.name and not gcs.name.endswith("/"):
        with gcs_errors(uri, "read the metadata of"):
            blob = bucket.get_blob(gcs.name, retry=retry, timeout=REQUEST_TIMEOUT_S)
    if blob is not None:
        return _fetch_gcs_object(uri, blob, cache_dir, retry)
    prefix = gcs.name if not gcs.name or gcs.name.endswith("/") else gcs.name + "/"
    tree_uri = f"gs://{gcs.bucket}/{prefix}"
    try:
        with gcs_errors(uri, "list"):
            listing = client.list_blobs(bucket, prefix=prefix, retry=retry, timeout=REQUEST_TIMEOUT_S)
            blobs = [b for b in listing if not b.name.endswith("/")]
    except StorageError as exc:
        if not isinstance(exc.__cause__, api_exceptions.NotFound):
            raise
        blobs = []  # the bucket itself is missing: say so below
    if not blobs:
        _raise_missing(uri, bucket, retry)
    return _fetch_gcs_tree(tree_uri, prefix, blobs, cache_dir, retry, workers)


def _raise_missing(uri: str, bucket: storage.Bucket, retry: Retry) -> None:
    exists: bool | None
    try:
        exists = bucket.exists(retry=retry, timeout=REQUEST_TIMEOUT_S)
    except api_exceptions.GoogleAPICallError:
        exists = None  # e.g. 403 without storage.buckets.get: we cannot tell.
    if exists is False:
        raise StorageError(
            f"{uri} does not exist: bucket gs://{bucket.name} was not found; "
            "check the bucket name and project."
        )
    raise StorageError(
        f"{uri} does not exist: check the bucket and object name, or pass a local path with --data."
    )


def _fetch_gcs_object(uri: str, blob: storage.Blob, cache_dir: Path, retry: Retry) -> Path:
    name = PurePosixPath(blob.name).name
    dest = cache_dir / cache_key(uri) / name
    sidecar = dest.with_name(name + SIDECAR_SUFFIX)
    meta = _blob_meta(uri, blob)
    recorded = _read_json(sidecar)
    if _is_current(dest, blob, recorded, meta):
        logger.info("Using cached %s (generation %s) at %s", uri, blob.generation, dest)
        if not _same_object(recorded, meta):
            write_json(sidecar, meta)
        return dest
    logger.info("Downloading %s (%.1f MB) to %s", uri, (blob.size or 0) / 1e6, dest)
    progress = TransferProgress(meta["size"], f"download {name}")
    sidecar.unlink(missing_ok=True)
    try:
        download_blob(blob, dest, retry=retry, progress=progress)
    except StorageError:
        dest.unlink(missing_ok=True)
        raise
    finally:
        progress.close()
    write_json(sidecar, meta)
    return dest


def _safe_relpath(rel: str) -> PurePosixPath | None:
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")):
        return None
    return path


def _fetch_gcs_tree(
    uri: str, prefix: str, blobs: list[storage.Blob], cache_dir: Path, retry: Retry, workers: int
) -> Path:
    """Mirror every object under `prefix` into cache_dir/<key>/<last prefix component or bucket>/."""
    name = PurePosixPath(prefix).name or blobs[0].bucket.name
    root = cache_dir / cache_key(uri) / name
    manifest_path = root.with_name(name + SIDECAR_SUFFIX)
    manifest = _read_json(manifest_path) or {}
    recorded: dict[str, Any] = manifest.get("objects", {}) if manifest.get("uri") == uri else {}
    objects: dict[str, dict[str, Any]] = {}
    todo: list[tuple[storage.Blob, Path]] = []
    for blob in blobs:
        rel = _safe_relpath(blob.name[len(prefix) :])
        if rel is None:
            logger.warning("Skipping gs://%s/%s: unsafe relative path", blob.bucket.name, blob.name)
            continue
        dest = root.joinpath(*rel.parts)
        meta = _blob_meta(f"gs://{blob.bucket.name}/{blob.name}", blob)
        if _is_current(dest, blob, recorded.get(str(rel)), meta):
            objects[str(rel)] = meta
        else:
            todo.append((blob, dest))
    total = sum(int(b.size or 0) for b, _ in todo)
    logger.info(
        "%s: %d objects, %d up to date, downloading %d (%.1f MB) with %d threads",
        uri,
        len(blobs),
        len(objects),
        len(todo),
        total / 1e6,
        workers,
    )
    progress = TransferProgress(total, f"download {name}/", total_files=len(todo)) if todo else None
    errors: list[BaseException] = []
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {pool.submit(download_blob, b, d, retry=retry, progress=progress): b for b, d in todo}
            for future in as_completed(futures):
                if future.cancelled():
                    continue
                blob = futures[future]
                if future.exception() is None:
                    objects[blob.name[len(prefix) :]] = _blob_meta(
                        f"gs://{blob.bucket.name}/{blob.name}", blob
                    )
                    continue
                errors.append(future.exception())
                if len(errors) == 1:  # fail fast: don't wait out the retry deadline for every remaining file
                    for other in futures:
                        other.cancel()
    finally:
        if progress is not None:
            progress.close()
        write_json(manifest_path, {"uri": uri, "objects": objects})
    if errors:
        missing = len(todo) - sum(1 for b, _ in todo if b.name[len(prefix) :] in objects)
        raise StorageError(
            f"{missing} of {len(todo)} objects under {uri} were not downloaded "
            f"(first error: {describe_error(errors[0])}): rerun to fetch only the missing ones."
        ) from errors[0]
    _remove_stale(root, set(objects))
    return root


def _remove_stale(root: Path, keep: set[str]) -> None:
    """Delete files in our cache tree that no longer exist remotely (and leftover temp files)."""
    for path in list(root.rglob("*")):
        if path.is_file() and path.relative_to(root).as_posix() not in keep:
            logger.info("Removing %s: no longer in the remote tree", path)
            path.unlink()


# ---------------------------------------------------------------------------------------------------------
# http(s)
# ---------------------------------------------------------------------------------------------------------


class _IncompleteDownload(ConnectionError):
    """Body shorter/longer than Content-Length (transient: retried)."""


def _is_loopback(host: str | None) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _http_meta(uri: str, headers: Any, size: int, digest: str | None) -> dict[str, Any]:
    return {
        "uri": uri,
        "etag": headers.get("ETag"),
        "last_modified": headers.get("Last-Modified"),
        "size": size,
        "sha256": digest,
    }


def _fetch_http(uri: str, cache_dir: Path, sha256: str | None, retry_deadline_s: float) -> Path:
    """Download `uri` (the full URL, query included) into the cache; logs, errors and the sidecar show it redacted."""
    parsed, shown = urlparse(uri), redact(uri)
    if parsed.scheme == "http" and not _is_loopback(parsed.hostname):
        logger.warning("%s uses plain http: integrity relies on the sha256 you pass, if any", shown)
    expected_sha = sha256.lower() if sha256 else None
    name = PurePosixPath(parsed.path).name or DEFAULT_HTTP_NAME
    dest = cache_dir / cache_key(uri) / name
    sidecar = dest.with_name(name + SIDECAR_SUFFIX)
    retry = make_retry(retry_deadline_s)
    headers = {"Accept-Encoding": "identity"}
    with requests.Session() as session:
        recorded = _read_json(sidecar)
        if recorded and dest.is_file() and dest.stat().st_size == recorded.get("size"):
            if expected_sha and recorded.get("sha256") == expected_sha:
                logger.info("Using cached %s (sha256 matches) at %s", shown, dest)
                return dest
            if not expected_sha and _http_unchanged(session, uri, headers, recorded, retry):
                logger.info("Using cached %s (unchanged on the server) at %s", shown, dest)
                return dest
        sidecar.unlink(missing_ok=True)
        dest.parent.mkdir(parents=True, exist_ok=True)

        def attempt() -> tuple[Any, int, str]:
            return _http_download_once(session, uri, headers, dest, expected_sha)

        with _http_errors(shown):
            resp_headers, size, digest = retry(attempt)()
    write_json(sidecar, _http_meta(shown, resp_headers, size, digest))
    return dest


def _http_unchanged(
    session: requests.Session, uri: str, headers: dict[str, str], recorded: dict[str, Any], retry: Retry
) -> bool:
    """One HEAD request: same ETag (or same Last-Modified and size) as when we cached it."""
    try:
        resp = retry(session.head)(uri, headers=headers, allow_redirects=True, timeout=REQUEST_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - a failed HEAD just means "download again"
        logger.info("HEAD %s failed (%s); downloading again", redact(uri), redact(repr(exc)))
        return False
    if not resp.ok:
        return False
    etag, modified = resp.headers.get("ETag"), resp.headers.get("Last-Modified")
    length = resp.headers.get("Content-Length")
    if etag and recorded.get("etag"):
        return etag == recorded["etag"]
    return (
        bool(modified) and modified == recorded.get("last_modified") and length == str(recorded.get("size"))
    )


def _http_download_once(
    session: requests.Session, uri: str, headers: dict[str, str], dest: Path, expected_sha: str | None
) -> tuple[Any, int, str]:
    """One streamed GET to a temp file; check status, size and sha256; rename only when all pass."""
    tmp = temp_path_for(dest)
    try:
        with session.get(uri, headers=headers, stream=True, timeout=REQUEST_TIMEOUT_S) as resp:
            resp.raise_for_status()
            length = resp.headers.get("Content-Length")
            expected = int(length) if length is not None and length.isdigit() else None
            progress = TransferProgress(expected, f"download {dest.name}")
            digest = hashlib.sha256()
            size = 0
            try:
                with open(tmp, "wb") as fh:
                    for chunk in resp.iter_content(HTTP_CHUNK_BYTES):
                        fh.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                        progress.update(len(chunk))
            finally:
                progress.close()
            if expected is not None and size != expected:
                raise _IncompleteDownload(f"got {size} bytes but Content-Length was {expected}")
            if expected_sha and digest.hexdigest() != expected_sha:
                raise StorageError(
                    f"{redact(uri)} has sha256 {digest.hexdigest()} but {expected_sha} was expected: "
                    "the download was deleted; check the URL and the expected checksum."
                )
            os.replace(tmp, dest)
            return resp.headers, size, digest.hexdigest()
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _http_errors(uri: str) -> Iterator[None]:
    """Download failures as StorageErrors naming `uri` (pass it redacted)."""
    def unreachable_host(reason: str) -> str:
        return f"{uri} could not be downloaded: {redact(reason)}; check the URL and your network."

    with _unreachable_fails_fast(unreachable_host), _http_call_errors(uri):
        yield


@contextlib.contextmanager
def _http_call_errors(uri: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except requests.exceptions.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        if status == requests.codes.not_found:
            raise StorageError(f"{uri} does not exist (HTTP 404): check the URL.") from exc
        raise StorageError(
            f"{uri} could not be downloaded (HTTP {status}): check the URL and access."
        ) from exc
    except api_exceptions.RetryError as exc:
        raise StorageError(
            f"{uri} could not be downloaded: still failing after retrying ({redact(describe_error(exc))}); "
            "check the URL and your network, then rerun."
        ) from exc
    except (requests.exceptions.RequestException, OSError) as exc:
        raise StorageError(
            f"{uri} could not be downloaded ({redact(repr(exc))}): check the URL and your network."
        ) from exc


__all__ = [
    "DEFAULT_RETRY_DEADLINE_S",
    "FileChecksums",
    "GcsUri",
    "TransferProgress",
    "cache_key",
    "checksum_mismatch",
    "describe_error",
    "download_blob",
    "fetch_dataset",
    "file_checksums",
    "gcs_errors",
    "is_transient",
    "make_client",
    "make_retry",
]
