"""Data in: fetch the dataset from a local path, gs:// or http(s):// into a local cache, re-downloaded only when
the remote object changed, and the record of which version was fetched. No TensorFlow here."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import requests
from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry
from google.cloud import storage

from job.errors import JobError, StorageError
from job.files import cache_key, safe_relpath, write_json
from job.gcs import (
    DEFAULT_RETRY_DEADLINE_S,
    DEFAULT_WORKERS,
    REQUEST_TIMEOUT_S,
    GcsUri,
    checksum_mismatch,
    describe_error,
    download_blob,
    gcs_errors,
    make_client,
    make_retry,
    redact,
    temp_path_for,
    unreachable_fails_fast,
)
from job.progress import TransferProgress

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".meta.json"
HTTP_CHUNK_BYTES = 1 << 20
DEFAULT_HTTP_NAME = "download"


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
        rel = safe_relpath(blob.name[len(prefix) :])
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

    with unreachable_fails_fast(unreachable_host), _http_call_errors(uri):
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


__all__ = ["SIDECAR_SUFFIX", "fetch_dataset", "fetched_version"]
