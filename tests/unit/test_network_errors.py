"""Unreachable servers fail fast: a host that does not resolve or a refused port is one `error:` line with
the storage errors' exit code within seconds (before: ~110 s of retries). Real 429/5xx/resets still retry."""

from __future__ import annotations

import socket
import time

import pytest
import requests
from google.api_core import exceptions as api_exceptions

from job.errors import StorageError
from job.gcs import UPLOAD_SESSION_RESTARTS, describe_error, is_transient, session_lost, unreachable, upload_restarting
from tests.jobproc import job_args, run_job

FAIL_FAST_S = 15.0


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("kind", ["dns", "refused-https", "refused-gcs"])
def test_unreachable_data_fails_fast(tmp_path, kind):
    """Before: retried for the 120 s deadline (~110 s), then exit 3 (or silently, for the emulator host)."""
    port = closed_port()
    data, env = {
        "dns": ("https://example.invalid/x.zip", {}),
        "refused-https": (f"http://127.0.0.1:{port}/x.zip", {}),
        "refused-gcs": ("gs://bucket/x.zip", {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}),
    }[kind]
    start = time.monotonic()
    result = run_job(job_args("run", data, tmp_path / "out", tmp_path / "cache"), timeout=120, **env)
    elapsed = time.monotonic() - start
    assert result.returncode == StorageError.exit_code, result.stderr[-2000:]
    assert elapsed < FAIL_FAST_S, elapsed
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr
    assert ("does not resolve" if kind == "dns" else "refused the connection") in lines[-1]
    assert "Retrying" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_transient_errors_still_retry():
    reset = requests.exceptions.ConnectionError(ConnectionResetError(104, "Connection reset by peer"))
    assert is_transient(reset) and unreachable(reset) is None
    try:
        requests.get(f"http://127.0.0.1:{closed_port()}/", timeout=5)
    except requests.exceptions.ConnectionError as refused:
        assert not is_transient(refused) and "refused the connection" in unreachable(refused)


def _not_found(url: str) -> api_exceptions.NotFound:
    """The library's error for a 404 answer to a request for `url`."""
    response = requests.Response()
    response.status_code = 404
    response.request = requests.Request("PUT", url).prepare()
    return api_exceptions.NotFound(f"PUT {url}: Not Found", response=response)


@pytest.mark.parametrize(
    ("url", "calls"),
    [
        ("http://gcs/upload/storage/v1/b/b/o?uploadType=resumable&upload_id=abc", UPLOAD_SESSION_RESTARTS + 1),
        ("http://gcs/upload/storage/v1/b/missing/o?uploadType=resumable", 1),  # the bucket: no new session helps
    ],
)
def test_an_upload_whose_session_is_gone_starts_again_a_bounded_number_of_times(url, calls):
    """Before: a 404 from the session URI failed at once as 'gs://… does not exist'."""
    made = []

    def upload() -> None:
        made.append(1)
        raise _not_found(url)

    with pytest.raises(StorageError, match="gs://b/x") as info:
        upload_restarting("gs://b/x", upload)
    assert len(made) == calls
    assert session_lost(info.value) == (calls > 1)


def test_error_reasons_show_no_session_id():
    """A session URI lets anyone holding it write the object: reasons in logs and errors redact the query
    (before: 'HTTP 404 PUT http://…&upload_id=abc: Not Found')."""
    reason = describe_error(_not_found("http://gcs/upload/storage/v1/b/b/o?uploadType=resumable&upload_id=abc"))
    assert reason.startswith("HTTP 404") and "abc" not in reason and "?<redacted>" in reason
