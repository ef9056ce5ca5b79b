"""Google Cloud Storage primitives: the client, the retry policy, errors as one sentence, checksums and a
verified download. `job.fetch` (data in) and `job.sync` (artifacts out) build on them. No TensorFlow here."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import logging
import os
import re
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from job.progress import CountingWriter, TransferProgress

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
# A resumable upload's session URI answering 404/410: the server no longer knows the session (it expired, or
# it finished while its answer was lost and this server forgets finished sessions); the remedy is a new upload.
SESSION_GONE_STATUS = frozenset({404, 410})
SESSION_QUERY_KEY = "upload_id="
UPLOAD_SESSION_RESTARTS = 2

DEFAULT_WORKERS = 32
PARTIAL_SUFFIX = ".partial"
HASH_CHUNK_BYTES = 1 << 20

MAX_CAUSE_DEPTH = 5
# A URL's query string (a signed URL's signature and expiry) never reaches a log, an error or a record on disk.
REDACTED_QUERY = "?<redacted>"
QUERY_RE = re.compile(r"\?[^\s'\"<>()]+")
MAX_REASON_CHARS = 200

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


def session_lost(exc: BaseException) -> bool:
    """True when a resumable upload failed because its session URI answered 404/410 (the session is gone)."""
    for cause in _causes(exc):
        response = getattr(cause, "response", None)
        request = getattr(response, "request", None)
        if (
            getattr(response, "status_code", None) in SESSION_GONE_STATUS
            and SESSION_QUERY_KEY in (getattr(request, "url", None) or "")
        ):
            return True
    return False


def upload_restarting(uri: str, upload: Callable[[], Any]) -> None:
    """Run `upload` (one library upload call, with its own retries) under gcs_errors; a resumable upload whose
    session is gone starts again with a new session, at most UPLOAD_SESSION_RESTARTS times."""
    for restart in range(UPLOAD_SESSION_RESTARTS + 1):
        try:
            with gcs_errors(uri, "upload"):
                upload()
            return
        except StorageError as err:
            if restart == UPLOAD_SESSION_RESTARTS or not session_lost(err):
                raise
            logger.info("Uploading %s again: its resumable upload session is gone (%s)", uri, describe_error(err))


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
    """A short reason for logs and messages: 'HTTP 503', 'ConnectionResetError: ...', unwrapping retries; URL
    query strings (a resumable upload's session id, a signed URL's signature) redacted."""
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
        return _short(redact(f"HTTP {exc.code} {exc.message}".strip()))  # the message holds the request's URL
    text = _short(redact(str(exc)))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _short(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "..."


@contextlib.contextmanager
def gcs_errors(
    uri: str, action: str, fix: str = "check the URI and your network, then rerun"
) -> Iterator[None]:
    """Turn google-cloud-storage exceptions into one-sentence StorageErrors naming `uri`."""
    def unreachable_host(reason: str) -> str:
        return f"Could not {action} {uri}: {reason}; check the URI, {EMULATOR_ENV_VAR} if set, and your network."

    with unreachable_fails_fast(unreachable_host), _gcs_call_errors(uri, action, fix):
        yield


@contextlib.contextmanager
def unreachable_fails_fast(message: Callable[[str], str]) -> Iterator[None]:
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
            target: Any = CountingWriter(fh, progress) if progress is not None else fh
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


__all__ = [
    "DEFAULT_RETRY_DEADLINE_S",
    "FileChecksums",
    "GcsUri",
    "checksum_mismatch",
    "describe_error",
    "download_blob",
    "file_checksums",
    "gcs_errors",
    "gcs_object_exists",
    "is_transient",
    "make_client",
    "make_retry",
    "redact",
    "session_lost",
    "unreachable",
    "upload_restarting",
]
