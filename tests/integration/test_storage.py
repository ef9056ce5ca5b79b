"""Object-storage layer against gcp-storage-emulator (and a fault-injecting proxy). No TensorFlow here."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import random
import signal
import subprocess
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import google.auth
import pytest
import requests
from click.testing import CliRunner
from google.auth.exceptions import DefaultCredentialsError
from google.cloud import storage

import job.gcs as job_gcs
from job.cli import main
from job.errors import JobError, StorageError
from job.fetch import SIDECAR_SUFFIX, fetch_dataset
from job.files import atomic_path
from job.rundir import data_identity
from job.sync import STATE_SUFFIX, OutputSync, is_completion_marker, is_in_progress, is_marker, open_output
from tests.integration.conftest import Emulator
from tests.integration.faultproxy import LOOPBACK, FaultProxy

FAST_RETRY_INITIAL_S = 0.01
FAST_RETRY_MAX_S = 0.2
SHORT_DEADLINE_S = 1.5
RESUMABLE_DEADLINE_S = 30.0
RESUMABLE_UPLOAD_BYTES = 9 << 20
SECRET = "c2lnbmF0dXJl0123"
ATOMIC_TMP = "checkpoint.tmp" + "0123456789abcdef" * 2


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep exponential backoff, but in milliseconds."""
    monkeypatch.setattr(job_gcs, "RETRY_INITIAL_DELAY_S", FAST_RETRY_INITIAL_S)
    monkeypatch.setattr(job_gcs, "RETRY_MAX_DELAY_S", FAST_RETRY_MAX_S)


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def _zip_bytes(seed: int, n_files: int = 5, size: int = 20_000) -> bytes:
    rng = random.Random(seed)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(n_files):
            zf.writestr(f"tiny-imagenet-200/train/n0{i}/img_{i}.JPEG", rng.randbytes(size))
    return buf.getvalue()


def _upload(client: storage.Client, bucket: str, name: str, data: bytes) -> storage.Blob:
    blob = client.bucket(bucket).blob(name)
    blob.upload_from_string(data)
    return blob


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _remote(client: storage.Client, bucket: str, prefix: str) -> dict[str, storage.Blob]:
    return {b.name[len(prefix) :]: b for b in client.list_blobs(bucket, prefix=prefix)}


def _media_gets(proxy: FaultProxy) -> int:
    return proxy.stats.count("GET", "alt=media")


def _make_run_dir(root: Path) -> dict[str, bytes]:
    """A run directory as TF leaves it mid-training, plus in-progress files that must not be uploaded."""
    rng = random.Random(7)
    files = {
        "ckpt/ckpt-1.data-00000-of-00001": rng.randbytes(50_000),
        "ckpt/ckpt-1.index": rng.randbytes(300),
        "ckpt/checkpoint": b'model_checkpoint_path: "ckpt-1"\n',
        "logs/train/events.out.tfevents.1700000000.host.1.v2": rng.randbytes(2_000),
        "metrics.json": b'{"loss": 1.0}',
        "checkpoints/pretext/done.json": b"{}",
        "stage/done.json": b'{"steps": 1}',
    }
    in_progress = {
        f"ckpt/{ATOMIC_TMP}": b"half",
        "ckpt/ckpt-2_temp/part-00000-of-00001.data-00000-of-00001": b"partial shard",
        "tmpabc123": b"x",
        "weights.h5.tmp": b"x",
        "dl.zip.partial": b"x",
    }
    for rel, data in {**files, **in_progress}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


@pytest.fixture
def make_sync() -> Iterator[Callable[..., OutputSync]]:
    """OutputSync factory whose clients are closed after the test (without a final push)."""
    made: list[OutputSync] = []

    def make(*args: Any, **kwargs: Any) -> OutputSync:
        made.append(OutputSync(*args, **kwargs))
        return made[-1]

    yield make
    for sync in made:
        sync.client.close()


@pytest.fixture
def upload_order(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Object names in the order uploads were started (wraps the library's upload entry points)."""
    order: list[str] = []
    lock = threading.Lock()
    for method in ("upload_from_filename", "upload_from_string"):
        original = getattr(storage.Blob, method)

        def wrapped(self: storage.Blob, *args: Any, _original: Callable = original, **kwargs: Any) -> Any:
            with lock:
                order.append(self.name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(storage.Blob, method, wrapped)
    return order


# ---------------------------------------------------------------------------------------------------------
# fetch_dataset: gs://
# ---------------------------------------------------------------------------------------------------------


def test_fetch_zip_verified_cached_and_refreshed(gcs_emulator: Emulator, flaky_proxy, tmp_path: Path) -> None:
    proxy = flaky_proxy()  # no faults: just counts requests
    client = gcs_emulator.client()
    data = _zip_bytes(seed=1)
    _upload(client, gcs_emulator.bucket, "data/tiny.zip", data)
    uri = f"gs://{gcs_emulator.bucket}/data/tiny.zip"

    path = fetch_dataset(uri, tmp_path)
    assert path.name == "tiny.zip" and path.read_bytes() == data
    assert zipfile.is_zipfile(path)
    assert path.with_name("tiny.zip.meta.json").is_file()
    assert _media_gets(proxy) == 1

    before = len(proxy.stats.requests)
    assert fetch_dataset(uri, tmp_path) == path
    assert proxy.stats.requests[before:] == [proxy.stats.requests[before]]  # exactly one request...
    assert proxy.stats.requests[before][0] == "GET" and "alt=media" not in proxy.stats.requests[before][1]
    assert _media_gets(proxy) == 1  # ...and it was metadata only

    changed = _zip_bytes(seed=2)
    _upload(client, gcs_emulator.bucket, "data/tiny.zip", changed)
    assert fetch_dataset(uri, tmp_path) == path
    assert path.read_bytes() == changed
    assert _media_gets(proxy) == 2
    assert not list(path.parent.glob("*.partial"))


def test_fetch_prefix_tree_and_resync(gcs_emulator: Emulator, flaky_proxy, tmp_path: Path) -> None:
    proxy = flaky_proxy()
    client = gcs_emulator.client()
    rng = random.Random(3)
    files = {f"train/n{c:02d}/images/n{c:02d}_{i}.JPEG": rng.randbytes(800) for c in range(3) for i in range(6)}
    files["wnids.txt"] = b"n00\nn01\nn02\n"
    files["val/val_annotations.txt"] = b"val_0.JPEG\tn00\n"
    for rel, data in files.items():
        _upload(client, gcs_emulator.bucket, f"data/tiny-imagenet-200/{rel}", data)
    _upload(client, gcs_emulator.bucket, "data/other/ignored.txt", b"not under the prefix")

    root = fetch_dataset(f"gs://{gcs_emulator.bucket}/data/tiny-imagenet-200/", tmp_path, workers=4)
    assert root.name == "tiny-imagenet-200" and _tree(root) == files
    assert _media_gets(proxy) == len(files)

    # Unchanged: one listing, no media downloads.
    fetch_dataset(f"gs://{gcs_emulator.bucket}/data/tiny-imagenet-200/", tmp_path, workers=4)
    assert _media_gets(proxy) == len(files)

    # One object changed, one deleted remotely: only the changed one is downloaded, the deleted one removed.
    files["wnids.txt"] = b"n00\nn01\n"
    _upload(client, gcs_emulator.bucket, "data/tiny-imagenet-200/wnids.txt", files["wnids.txt"])
    client.bucket(gcs_emulator.bucket).blob("data/tiny-imagenet-200/val/val_annotations.txt").delete()
    del files["val/val_annotations.txt"]
    fetch_dataset(f"gs://{gcs_emulator.bucket}/data/tiny-imagenet-200/", tmp_path, workers=4)
    assert _tree(root) == files
    assert _media_gets(proxy) == len(files) + 2

    # A parent prefix without a trailing slash is a tree too; it contains tiny-imagenet-200/.
    parent = fetch_dataset(f"gs://{gcs_emulator.bucket}/data", tmp_path, workers=4)
    assert parent.name == "data" and (parent / "tiny-imagenet-200" / "wnids.txt").is_file()


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("gs://test-bucket/data/missing.zip", "gs://test-bucket/data/missing.zip does not exist"),
        ("gs://test-bucket/missing-prefix/", "gs://test-bucket/missing-prefix/ does not exist"),
        ("gs://no-such-bucket/data/tiny.zip", "bucket gs://no-such-bucket was not found"),
    ],
)
def test_fetch_missing_names_uri(gcs_emulator: Emulator, tmp_path: Path, uri: str, expected: str) -> None:
    with pytest.raises(StorageError, match=expected) as info:
        fetch_dataset(uri, tmp_path)
    assert uri in str(info.value) and info.value.exit_code == 3


def test_fetch_checksum_mismatch_deletes_file(gcs_emulator: Emulator, tmp_path: Path) -> None:
    client = gcs_emulator.client()
    blob = _upload(client, gcs_emulator.bucket, "data/bad.zip", _zip_bytes(seed=4))
    blob.reload()
    blob.md5_hash = _md5_b64(b"something else")  # metadata now disagrees with the content
    blob.patch()
    uri = f"gs://{gcs_emulator.bucket}/data/bad.zip"
    with pytest.raises(StorageError, match="failed verification") as info:
        fetch_dataset(uri, tmp_path)
    assert uri in str(info.value)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_fetch_tree_with_bad_object_fails_and_keeps_good_ones(gcs_emulator: Emulator, tmp_path: Path) -> None:
    client = gcs_emulator.client()
    for i in range(6):
        _upload(client, gcs_emulator.bucket, f"tree/tiny-imagenet-200/f{i}.txt", f"file {i}".encode())
    bad = client.bucket(gcs_emulator.bucket).get_blob("tree/tiny-imagenet-200/f3.txt")
    bad.md5_hash = _md5_b64(b"other")
    bad.patch()
    uri = f"gs://{gcs_emulator.bucket}/tree/tiny-imagenet-200/"
    with pytest.raises(StorageError, match="objects under gs://test-bucket/tree/tiny-imagenet-200/") as info:
        fetch_dataset(uri, tmp_path, workers=2)
    assert "f3.txt failed verification" in str(info.value)
    root = next(tmp_path.glob("*/tiny-imagenet-200"))
    assert "f3.txt" not in _tree(root) and not list(root.rglob("*.partial"))

    bad.md5_hash = _md5_b64(b"file 3")  # fixed remotely: the rerun fetches what is missing
    bad.patch()
    assert _tree(fetch_dataset(uri, tmp_path, workers=2)) == {f"f{i}.txt": f"file {i}".encode() for i in range(6)}


def test_fetch_corrupted_download_deletes_file(
    gcs_emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _upload(gcs_emulator.client(), gcs_emulator.bucket, "data/flip.zip", _zip_bytes(seed=5))
    original = storage.Blob.download_to_file

    def corrupting(self: storage.Blob, file_obj: Any, *args: Any, **kwargs: Any) -> None:
        buf = io.BytesIO()
        original(self, buf, *args, **kwargs)
        data = bytearray(buf.getvalue())
        data[len(data) // 2] ^= 0xFF
        file_obj.write(bytes(data))

    monkeypatch.setattr(storage.Blob, "download_to_file", corrupting)
    with pytest.raises(StorageError, match="gs://test-bucket/data/flip.zip failed verification"):
        fetch_dataset(f"gs://{gcs_emulator.bucket}/data/flip.zip", tmp_path)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_missing_credentials_outside_emulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    with pytest.raises(StorageError, match="gcloud auth application-default login") as info:
        fetch_dataset("gs://some-bucket/tiny.zip", tmp_path)
    assert "no-such-key.json" in str(info.value)

    def no_credentials(*args: Any, **kwargs: Any) -> Any:
        raise DefaultCredentialsError("Your default credentials were not found.")

    monkeypatch.setattr(google.auth, "default", no_credentials)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    with pytest.raises(StorageError, match="GOOGLE_APPLICATION_CREDENTIALS") as info:
        OutputSync("gs://some-bucket/run", run).push()
    assert "gcloud auth application-default login" in str(info.value)


def test_fetch_local_path(tmp_path: Path) -> None:
    (tmp_path / "tiny-imagenet-200").mkdir()
    assert fetch_dataset(str(tmp_path), tmp_path / "cache") == tmp_path
    with pytest.raises(JobError, match="does not exist") as info:
        fetch_dataset(str(tmp_path / "nope.zip"), tmp_path / "cache")
    assert not isinstance(info.value, StorageError)


# ---------------------------------------------------------------------------------------------------------
# fetch_dataset: http(s)
# ---------------------------------------------------------------------------------------------------------


class _Handler(SimpleHTTPRequestHandler):
    """Serves a directory; /short/<name> promises more bytes than it sends."""

    hits: list[str]

    def do_GET(self) -> None:
        self.hits.append(self.path)
        if self.path.startswith("/short/"):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.close_connection = True
            return
        super().do_GET()

    def do_HEAD(self) -> None:
        self.hits.append("HEAD " + self.path)
        super().do_HEAD()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_site(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    site = tmp_path / "site"
    site.mkdir()
    hits: list[str] = []
    handler = type("Handler", (_Handler,), {"hits": hits})
    server = ThreadingHTTPServer((LOOPBACK, 0), partial(handler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://{LOOPBACK}:{server.server_address[1]}", site, hits
    server.shutdown()
    server.server_close()


def test_fetch_http(http_site: tuple[str, Path, list[str]], tmp_path: Path) -> None:
    base, site, hits = http_site
    data = _zip_bytes(seed=6)
    (site / "tiny.zip").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    cache = tmp_path / "cache"

    path = fetch_dataset(f"{base}/tiny.zip", cache, sha256=digest)
    assert path.read_bytes() == data and hits == ["/tiny.zip"]
    assert fetch_dataset(f"{base}/tiny.zip", cache, sha256=digest) == path
    assert hits == ["/tiny.zip"]  # cached, sha256 recorded: no request at all
    assert fetch_dataset(f"{base}/tiny.zip", cache) == path
    assert hits == ["/tiny.zip", "HEAD /tiny.zip"]  # no sha256 given: one HEAD, unchanged

    other = tmp_path / "cache2"
    with pytest.raises(StorageError, match="sha256"):
        fetch_dataset(f"{base}/tiny.zip", other, sha256="0" * 64)
    assert [p for p in other.rglob("*") if p.is_file()] == []

    with pytest.raises(StorageError, match="does not exist"):
        fetch_dataset(f"{base}/missing.zip", other)


@pytest.fixture
def _restore_signals() -> Iterator[None]:
    """The CLI installs its SIGTERM/SIGUSR1 handlers: put the test runner's back."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.mark.usefixtures("_restore_signals")
def test_data_sha256_reaches_the_https_check_from_the_command_line(
    http_site: tuple[str, Path, list[str]], tmp_path: Path
) -> None:
    """`--set data.sha256=...` is checked against the download (exit 3), before anything is written."""
    base, site, hits = http_site
    data = _zip_bytes(seed=7)
    (site / "tiny.zip").write_bytes(data)
    output, cache = tmp_path / "run", tmp_path / "cache"
    common = ["run", "--data", f"{base}/tiny.zip", "--output", str(output), "--set", f"data.cache_dir={cache}"]

    result = CliRunner().invoke(main, [*common, "--set", "data.sha256=" + "0" * 64])
    assert result.exit_code == 3, (result.output, result.exception)
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and f"has sha256 {hashlib.sha256(data).hexdigest()}" in error, error
    assert f"but {'0' * 64} was expected" in error, error
    assert hits == ["/tiny.zip"]
    assert not output.exists() and [p for p in cache.rglob("*") if p.is_file()] == []


@pytest.mark.usefixtures("_restore_signals")
def test_data_sha256_with_data_that_is_not_downloaded_over_https_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "tiny.zip"
    archive.write_bytes(_zip_bytes(seed=8))
    result = CliRunner().invoke(main, ["run", "--data", str(archive), "--output", str(tmp_path / "run"), "--set",
                                       f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.sha256=" + "a" * 64])
    assert result.exit_code == 2, (result.output, result.exception)
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: data.sha256 is checked on https:// downloads only"), error


def test_signed_url_query_is_redacted_but_used(
    http_site: tuple[str, Path, list[str]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the signature was in the sidecar (`"uri": ".../tiny.zip?X-Goog-Signature=..."`), the logs and the
    errors, and in run.json / done.json through the data identity."""
    caplog.set_level(logging.DEBUG)
    base, site, hits = http_site
    (site / "tiny.zip").write_bytes(_zip_bytes(seed=8))
    query = f"X-Goog-Signature={SECRET}&X-Goog-Expires=600"
    cache = tmp_path / "cache"

    path = fetch_dataset(f"{base}/tiny.zip?{query}", cache)
    assert hits == [f"/tiny.zip?{query}"]  # downloaded with the full URL
    assert fetch_dataset(f"{base}/tiny.zip?{query}", cache) == path  # cached: HEAD, unchanged
    assert hits[-1] == f"HEAD /tiny.zip?{query}"
    (sidecar,) = cache.rglob(f"*{SIDECAR_SUFFIX}")
    assert f'"{base}/tiny.zip?<redacted>"' in sidecar.read_text()
    identity = data_identity(f"{base}/tiny.zip?{query}", path)
    assert identity["uri"] == f"{base}/tiny.zip?<redacted>"

    with pytest.raises(StorageError) as info:
        fetch_dataset(f"{base}/missing.zip?{query}", cache)
    assert f"{base}/missing.zip?<redacted>" in str(info.value)
    refused = f"http://{LOOPBACK}:1/tiny.zip?{query}"  # nothing listens on port 1: a connection error
    with pytest.raises(StorageError) as info:
        fetch_dataset(refused, cache, retry_deadline_s=0.2)
    texts = [str(info.value), caplog.text, *(p.read_text() for p in cache.rglob("*.json"))]
    assert all(SECRET not in text for text in texts), [t for t in texts if SECRET in t]
    assert "?<redacted>" in caplog.text


def test_fetch_http_short_body_fails_after_retries(http_site: tuple[str, Path, list[str]], tmp_path: Path) -> None:
    base, _, hits = http_site
    with pytest.raises(StorageError, match="after retrying") as info:
        fetch_dataset(f"{base}/short/tiny.zip", tmp_path, retry_deadline_s=0.3)
    assert f"{base}/short/tiny.zip" in str(info.value)
    assert len(hits) > 1  # retried
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


# ---------------------------------------------------------------------------------------------------------
# OutputSync
# ---------------------------------------------------------------------------------------------------------


def test_temp_and_marker_rules() -> None:
    assert is_marker("ckpt/checkpoint") and is_marker("stage/done.json")
    assert not is_marker("ckpt/ckpt-1.index") and not is_marker("checkpoints/x")
    # done.json is the one completion marker the job writes; names it never writes are plain files.
    assert is_completion_marker("checkpoints/pretext/done.json") and is_completion_marker("done.json")
    assert not is_marker("DONE") and not is_marker("a/_SUCCESS") and not is_marker("pretext.complete.json")
    assert not is_completion_marker("ckpt/checkpoint") and not is_completion_marker("done.json.tmp")
    assert is_in_progress(f"ckpt/{ATOMIC_TMP}") and is_in_progress("ckpt/ckpt-3_temp/part-0.index")
    assert is_in_progress("a.tmp") and is_in_progress("b.partial") and is_in_progress("tmpxyz")
    assert not is_in_progress("ckpt/ckpt-1.data-00000-of-00001")


def test_files_being_written_atomically_are_not_uploaded(gcs_emulator: Emulator, tmp_path: Path, make_sync) -> None:
    """Before: the half-written `.tmp-<token>-best.weights.h5` went up beside the run, and stayed there."""
    run = tmp_path / "run"
    sync = make_sync(f"gs://{gcs_emulator.bucket}/runs/atomic", run)
    weights = run / "checkpoints/pretext/best.weights.h5"
    with atomic_path(weights) as tmp:
        tmp.write_bytes(b"half of the weights")
        sync.push()  # a periodic push while Keras writes
        tmp.write_bytes(b"all of the weights")
    sync.push()
    objects = _remote(gcs_emulator.client(), gcs_emulator.bucket, "runs/atomic/")
    assert set(objects) == {"checkpoints/pretext/best.weights.h5"}
    assert objects["checkpoints/pretext/best.weights.h5"].md5_hash == _md5_b64(b"all of the weights")


def test_push_uploads_once_in_order(
    gcs_emulator: Emulator, flaky_proxy, upload_order: list[str], tmp_path: Path, make_sync
) -> None:
    proxy = flaky_proxy()
    run = tmp_path / "run"
    files = _make_run_dir(run)
    remote = f"gs://{gcs_emulator.bucket}/runs/r1"
    sync = make_sync(remote, run, workers=4)

    stats = sync.push()
    assert stats.files_uploaded == len(files)
    assert stats.bytes_uploaded == sum(len(d) for d in files.values())
    assert stats.requests == len(files) + 1  # one listing (nothing known yet) + one upload each
    objects = _remote(gcs_emulator.client(), gcs_emulator.bucket, "runs/r1/")
    assert set(objects) == set(files)  # temp files and TF temp dirs were skipped
    assert all(objects[rel].md5_hash == _md5_b64(data) for rel, data in files.items())

    pos = {name.removeprefix("runs/r1/"): i for i, name in enumerate(upload_order)}
    assert pos["ckpt/checkpoint"] > max(pos["ckpt/ckpt-1.index"], pos["ckpt/ckpt-1.data-00000-of-00001"])
    completions = {"checkpoints/pretext/done.json", "stage/done.json"}
    # A completion marker vouches for the whole run: it goes up after every other file, in any directory.
    assert min(pos[rel] for rel in completions) > max(pos[rel] for rel in files if rel not in completions)

    before = len(proxy.stats.requests)
    again = sync.push()
    assert (again.files_uploaded, again.requests) == (0, 0)
    assert len(proxy.stats.requests) == before

    events = run / "logs/train/events.out.tfevents.1700000000.host.1.v2"
    with events.open("ab") as fh:
        fh.write(b"more summaries")
    third = sync.push()
    assert third.files_uploaded == 1 and third.requests == 1
    refreshed = _remote(gcs_emulator.client(), gcs_emulator.bucket, "runs/r1/")
    assert refreshed[events.relative_to(run).as_posix()].md5_hash == _md5_b64(events.read_bytes())


def test_push_failure_holds_back_markers(gcs_emulator: Emulator, flaky_proxy, tmp_path: Path, make_sync) -> None:
    proxy = flaky_proxy()
    proxy.fail_pattern = b"ckpt-1.data-00000-of-00001"  # every attempt for this object gets a 503
    run = tmp_path / "run"
    files = _make_run_dir(run)
    sync = make_sync(f"gs://{gcs_emulator.bucket}/runs/r2", run, retry_deadline_s=SHORT_DEADLINE_S)

    with pytest.raises(StorageError) as info:
        sync.push()
    message = str(info.value)
    assert f"local copy is kept at {run}" in message and "ckpt/ckpt-1.data-00000-of-00001" in message
    assert proxy.stats.injected_503 > 1  # it was retried before giving up
    objects = _remote(gcs_emulator.client(), gcs_emulator.bucket, "runs/r2/")
    assert "ckpt/checkpoint" not in objects and "ckpt/ckpt-1.data-00000-of-00001" not in objects
    assert {"ckpt/ckpt-1.index", "metrics.json"} <= set(objects)  # other files go ahead...
    assert not {"checkpoints/pretext/done.json", "stage/done.json"} & set(objects)  # ...but nothing claims completion
    assert all(p.is_file() for p in (run / rel for rel in files))  # nothing deleted locally

    proxy.fail_pattern = None
    stats = sync.push()  # the failed file, its held-back index and the completion markers now go up
    assert stats.files_uploaded == 4  # ckpt-1.data, ckpt/checkpoint, two done.json
    assert set(_remote(gcs_emulator.client(), gcs_emulator.bucket, "runs/r2/")) == set(files)


def test_pull_reproduces_tree_and_resumes(gcs_emulator: Emulator, flaky_proxy, tmp_path: Path, make_sync) -> None:
    proxy = flaky_proxy()
    first = tmp_path / "vm1"
    files = _make_run_dir(first)
    remote = f"gs://{gcs_emulator.bucket}/runs/r3/"
    make_sync(remote, first).push()

    second = tmp_path / "vm2"
    sync = make_sync(remote, second)
    assert sync.pull() == len(files)
    assert _tree(second) == files
    assert sync.pull() == 0
    before = len(proxy.stats.requests)
    assert sync.push().files_uploaded == 0  # pulled files are known: no re-upload, no listing
    assert len(proxy.stats.requests) == before

    # Restarted process with files already on disk: its record (vm2.sync.json) says they are up there.
    restarted = make_sync(remote, second).push()
    assert (restarted.files_uploaded, restarted.requests) == (0, 0)
    # Without the record: one listing + md5 comparison, no uploads.
    (tmp_path / f"vm2{STATE_SUFFIX}").unlink()
    restarted = make_sync(remote, second).push()
    assert (restarted.files_uploaded, restarted.requests) == (0, 1)

    # Same VM restarted: a file changed here since it was synced (the bucket still holding what this mirror
    # saw) is this mirror's newer work: kept, and pushed. A checkpoint file differing from the published unit
    # is replaced whatever its time: the bucket's unit decides.
    (second / "metrics.json").write_bytes(b'{"loss": 0.5}')
    stale = second / "ckpt" / "ckpt-1.index"
    stale.write_bytes(b"stale")
    os.utime(stale, (time.time() + 3600, time.time() + 3600))  # "newer" by its mtime: before, it was kept
    resumed = make_sync(remote, second)
    assert resumed.pull() == 1
    assert (second / "metrics.json").read_bytes() == b'{"loss": 0.5}'
    assert stale.read_bytes() == files["ckpt/ckpt-1.index"]
    assert resumed.push().files_uploaded == 1


def test_background_thread_and_close(gcs_emulator: Emulator, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    client = gcs_emulator.client()
    with OutputSync(f"gs://{gcs_emulator.bucket}/runs/r4", run, interval_s=0.05) as sync:
        sync.start()
        (run / "a.txt").write_text("a")
        deadline = time.monotonic() + 5
        while "a.txt" not in _remote(client, gcs_emulator.bucket, "runs/r4/") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "a.txt" in _remote(client, gcs_emulator.bucket, "runs/r4/")
        (run / "b.txt").write_text("b")
        sync._runner.stop()  # stop periodic pushes; close() must still push b.txt
    assert set(_remote(client, gcs_emulator.bucket, "runs/r4/")) == {"a.txt", "b.txt"}
    assert sync.close() is sync.close()  # idempotent


def test_open_output(tmp_path: Path) -> None:
    local, syncer = open_output(str(tmp_path / "out"), tmp_path / "work")
    assert local == tmp_path / "out" and syncer is None
    local, syncer = open_output("gs://b/runs/x", tmp_path / "work", interval_s=7.5)
    assert syncer is not None and syncer.remote == "gs://b/runs/x/" and syncer.local_dir == local
    assert syncer.interval_s == 7.5  # runtime.sync_interval_s reaches the periodic push
    assert local.parent == tmp_path / "work" and local.is_dir() and len(local.name) == 16
    with pytest.raises(JobError, match="unsupported scheme"):
        open_output("s3://b/x", tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Faults: 503s, resets and truncated responses
# ---------------------------------------------------------------------------------------------------------


# Each call retries until the job's own deadline: backoff is in milliseconds here, so that is hundreds of
# tries, and a call still failing then is a bug, not bad luck (the 600 s tried before hid one: a resumable
# upload whose last answer was cut off retried a dead session, see the resumable tests below).
FAULTS_DEADLINE_S = job_gcs.DEFAULT_RETRY_DEADLINE_S
SESSION_URI = "upload_id="  # in the path of a resumable upload session's chunk PUTs


def test_flaky_network_push_pull_fetch_complete(gcs_emulator: Emulator, flaky_proxy, tmp_path: Path, make_sync) -> None:
    client = gcs_emulator.client()  # set up through the emulator directly (before the proxy)
    zip_data = _zip_bytes(seed=8, n_files=4, size=100_000)
    _upload(client, gcs_emulator.bucket, "data/tiny.zip", zip_data)
    rng = random.Random(9)
    tree = {f"train/n{i % 4}/img_{i}.JPEG": rng.randbytes(2_000) for i in range(30)}
    for rel, data in tree.items():
        _upload(client, gcs_emulator.bucket, f"data/tiny-imagenet-200/{rel}", data)

    proxy = flaky_proxy(fail_rate=0.2, reset_rate=0.05, truncate_rate=0.05, seed=11)
    path = fetch_dataset(f"gs://{gcs_emulator.bucket}/data/tiny.zip", tmp_path / "cache",
                         retry_deadline_s=FAULTS_DEADLINE_S)
    assert path.read_bytes() == zip_data
    root = fetch_dataset(f"gs://{gcs_emulator.bucket}/data/tiny-imagenet-200/", tmp_path / "cache", workers=4,
                         retry_deadline_s=FAULTS_DEADLINE_S)
    assert _tree(root) == tree

    run = tmp_path / "run"
    files = _make_run_dir(run)
    big = random.Random(10).randbytes(RESUMABLE_UPLOAD_BYTES)  # > 8 MiB: resumable upload session
    (run / "model").mkdir()
    (run / "model" / "backbone.keras").write_bytes(big)  # not a checkpoint: no index has to name it
    files["model/backbone.keras"] = big
    for i in range(20):
        (run / "logs" / f"scalar_{i}.json").write_text(f'{{"step": {i}}}')
        files[f"logs/scalar_{i}.json"] = f'{{"step": {i}}}'.encode()
    make_sync(f"gs://{gcs_emulator.bucket}/runs/flaky", run, workers=4, retry_deadline_s=FAULTS_DEADLINE_S).push()
    pulled = tmp_path / "pulled"
    assert make_sync(f"gs://{gcs_emulator.bucket}/runs/flaky", pulled, workers=4,
                     retry_deadline_s=FAULTS_DEADLINE_S).pull() == len(files)
    assert _tree(pulled) == files

    injected = proxy.stats.injected_503 + proxy.stats.injected_resets + proxy.stats.injected_truncations
    assert injected >= 10 and proxy.stats.injected_resets and proxy.stats.injected_truncations


def test_resumable_upload_whose_last_answer_is_cut_off_completes(
    gcs_emulator: Emulator, flaky_proxy, tmp_path: Path, make_sync
) -> None:
    """The answer to a resumable upload's last chunk is cut off: the stored object is complete, the retried chunk
    finds the session gone (the emulator forgets finished sessions: 404) and the upload starts again. Before:
    the proxy dropped the 404 (its upstream closed mid-body) and the reset was retried until the deadline (the
    flaky-network test's 10 minutes); with the 404 relayed, the push failed with 'does not exist'."""
    proxy = flaky_proxy()
    proxy.fault_next("truncate", method="PUT", contains=SESSION_URI)
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    big = random.Random(10).randbytes(RESUMABLE_UPLOAD_BYTES)  # > 8 MiB: a resumable upload
    (run / "model" / "backbone.keras").write_bytes(big)
    start = time.monotonic()
    stats = make_sync(f"gs://{gcs_emulator.bucket}/runs/r", run, retry_deadline_s=RESUMABLE_DEADLINE_S).push()
    assert stats.files_uploaded == 1
    assert time.monotonic() - start < RESUMABLE_DEADLINE_S
    blob = gcs_emulator.client().bucket(gcs_emulator.bucket).blob("runs/r/model/backbone.keras")
    assert blob.download_as_bytes() == big
    assert proxy.stats.injected_truncations == 1
    assert proxy.stats.count("POST", "uploadType=resumable") == 2  # the session, then a new one


def test_proxy_relays_an_answer_sent_before_the_request_body_was_read(gcs_emulator: Emulator, flaky_proxy) -> None:
    """The emulator answers a chunk for an unknown session at once and closes without reading the body: the
    client gets that 404 through the proxy (before: the proxy's send failed and it dropped the connection)."""
    proxy = flaky_proxy()
    body = bytes(RESUMABLE_UPLOAD_BYTES)  # more than the socket buffers hold
    response = requests.put(
        f"{proxy.host}/upload/storage/v1/b/{gcs_emulator.bucket}/o?uploadType=resumable&{SESSION_URI}unknown",
        data=body, headers={"Content-Range": f"bytes 0-{len(body) - 1}/{len(body)}"}, timeout=RESUMABLE_DEADLINE_S,
    )
    assert response.status_code == 404


# ---------------------------------------------------------------------------------------------------------
# Checkpoint units, bucket hygiene, --force in the bucket, the output's lease
# ---------------------------------------------------------------------------------------------------------


def _save_checkpoint(ckpt: Path, step: int, keep: list[int], epochs: int) -> None:
    """What Trainer._save leaves: the companions, TF's files, then the index naming the kept checkpoints."""
    rng = random.Random(step)
    (ckpt / f"ckpt-{step}.history.json").write_text(json.dumps([{"epoch": e} for e in range(1, epochs + 1)]))
    (ckpt / f"ckpt-{step}.best.weights.h5").write_bytes(rng.randbytes(3_000))
    (ckpt / f"ckpt-{step}.data-00000-of-00001").write_bytes(rng.randbytes(10_000))
    (ckpt / f"ckpt-{step}.index").write_bytes(rng.randbytes(200))
    for old in ckpt.iterdir():
        if old.name.startswith("ckpt-") and int(old.name.split(".")[0].split("-")[1]) not in keep:
            old.unlink()
    named = "".join(f'all_model_checkpoint_paths: "ckpt-{k}"\n' for k in keep)
    (ckpt / "checkpoint").write_text(f'model_checkpoint_path: "ckpt-{step}"\n{named}')


def test_failed_companion_upload_publishes_no_newer_checkpoint(
    gcs_emulator: Emulator, flaky_proxy, tmp_path: Path, make_sync
) -> None:
    """Epoch 2's best weights cannot be uploaded: the bucket keeps naming ckpt-2 with epoch 1's companions
    (before: best.weights.h5 and history.json lay one folder up, outside the index's ordering)."""
    proxy = flaky_proxy()
    ckpt = tmp_path / "run" / "checkpoints/pretext/ckpt"
    ckpt.mkdir(parents=True)
    sync = make_sync(f"gs://{gcs_emulator.bucket}/runs/unit", tmp_path / "run", retry_deadline_s=SHORT_DEADLINE_S)
    _save_checkpoint(ckpt, 2, keep=[2], epochs=1)
    sync.push()
    _save_checkpoint(ckpt, 4, keep=[2, 4], epochs=2)
    proxy.fail_pattern = b"ckpt-4.best.weights.h5"
    with pytest.raises(StorageError):
        sync.push()
    bucket = gcs_emulator.client().bucket(gcs_emulator.bucket)
    index = bucket.blob("runs/unit/checkpoints/pretext/ckpt/checkpoint").download_as_text()
    assert 'model_checkpoint_path: "ckpt-2"' in index
    history = bucket.blob("runs/unit/checkpoints/pretext/ckpt/ckpt-2.history.json").download_as_text()
    assert json.loads(history) == [{"epoch": 1}]
    proxy.fail_pattern = None
    sync.push()
    assert 'model_checkpoint_path: "ckpt-4"' in bucket.blob(
        "runs/unit/checkpoints/pretext/ckpt/checkpoint").download_as_text()


def test_dropped_checkpoints_leave_the_bucket_and_a_resume_pulls_only_the_latest(
    gcs_emulator: Emulator, tmp_path: Path, make_sync
) -> None:
    """Before: checkpoints the manager dropped stayed in the bucket, and every resume downloaded them all."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints/pretext/ckpt"
    ckpt.mkdir(parents=True)
    remote = f"gs://{gcs_emulator.bucket}/runs/hygiene"
    sync = make_sync(remote, run)
    for step in (2, 4, 6):
        _save_checkpoint(ckpt, step, keep=[s for s in (step - 2, step) if s > 0], epochs=step // 2)
        sync.push()
    objects = set(_remote(gcs_emulator.client(), gcs_emulator.bucket, "runs/hygiene/"))
    prefix = "checkpoints/pretext/ckpt/"
    assert {rel.removeprefix(prefix).split(".")[0] for rel in objects} == {"checkpoint", "ckpt-4", "ckpt-6"}

    fresh = tmp_path / "fresh"
    assert make_sync(remote, fresh).pull() == 5  # ckpt-6's four files and the index
    assert sorted(p.name for p in (fresh / prefix).iterdir()) == [
        "checkpoint", "ckpt-6.best.weights.h5", "ckpt-6.data-00000-of-00001", "ckpt-6.history.json",
        "ckpt-6.index"]


def test_force_clears_a_stage_in_the_bucket(gcs_emulator: Emulator, tmp_path: Path, make_sync) -> None:
    """Before: --force cleared only the mirror; an interrupted forced run, rerun without --force, pulled the
    old done.json back (here: on another machine, and on this one with its old mirror)."""
    run = tmp_path / "run"
    stage = run / "checkpoints/pretext"
    (stage / "ckpt").mkdir(parents=True)
    _save_checkpoint(stage / "ckpt", 2, keep=[2], epochs=1)
    (stage / "done.json").write_text('{"old": true}')
    (run / "config.json").write_text("{}")
    remote = f"gs://{gcs_emulator.bucket}/runs/force"
    make_sync(remote, run).push()
    stale_mirror = tmp_path / "old-mirror"
    make_sync(remote, stale_mirror).pull()

    forced = make_sync(remote, run)
    assert forced.clear("checkpoints/pretext") == 6
    assert set(_remote(gcs_emulator.client(), gcs_emulator.bucket, "runs/force/")) == {"config.json"}
    make_sync(remote, tmp_path / "other-machine").pull()
    assert not (tmp_path / "other-machine/checkpoints/pretext/done.json").exists()
    make_sync(remote, stale_mirror).pull()  # its done.json was synced from the bucket, which dropped it
    assert not (stale_mirror / "checkpoints/pretext/done.json").exists()
    assert not any((stale_mirror / "checkpoints/pretext/ckpt").iterdir())


def test_a_second_job_on_a_held_output_is_refused(gcs_emulator: Emulator, tmp_path: Path, make_sync) -> None:
    """Before: two jobs on one --output overwrote each other object by object."""
    remote = f"gs://{gcs_emulator.bucket}/runs/lease"
    first = make_sync(remote, tmp_path / "a")
    first.acquire(job=None)  # this process, alive: its lease holds
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("a")
    first.push()  # renews
    second = make_sync(remote, tmp_path / "b")
    with pytest.raises(JobError, match="--take-over") as info:
        second.acquire(job=None)
    assert "\n" not in str(info.value) and info.value.exit_code == 2 and remote in str(info.value)
    assert not (tmp_path / "b").exists()  # nothing touched

    second.acquire(job=None, take_over=True)
    with pytest.raises(JobError, match="taken over"):
        first.push()  # the old holder stops writing
    second.close()
    assert not gcs_emulator.client().bucket(gcs_emulator.bucket).blob("runs/lease/lease.json").exists()
    make_sync(remote, tmp_path / "c").acquire(job=None)  # released: free again


def test_a_restarted_job_or_a_dead_process_takes_its_output_back(
    gcs_emulator: Emulator, tmp_path: Path, make_sync
) -> None:
    remote = f"gs://{gcs_emulator.bucket}/runs/lease2"
    make_sync(remote, tmp_path / "a").acquire(job="slurm:7")
    make_sync(remote, tmp_path / "a").acquire(job="slurm:7")  # a requeue of the same job
    with pytest.raises(JobError, match="slurm:7"):
        make_sync(remote, tmp_path / "b").acquire(job="slurm:8")
    lease = gcs_emulator.client().bucket(gcs_emulator.bucket).blob("runs/lease2/lease.json")
    record = json.loads(lease.download_as_text())
    record.update(job=None, pid=_gone_pid())
    lease.upload_from_string(json.dumps(record))
    make_sync(remote, tmp_path / "b").acquire(job="slurm:8")  # its process on this host is gone


def _gone_pid() -> int:
    """The pid of a process that has ended."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid
