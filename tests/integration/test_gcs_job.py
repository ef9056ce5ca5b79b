"""The job with --data and --output in a GCS emulator, through injected faults, and resumed from the bucket."""

from __future__ import annotations

import base64
import hashlib
import signal
import subprocess
import time
from pathlib import Path

import pytest

from job.synth import make_synthetic_dataset
from tests.jobproc import REPO, job_args, job_env, run_job

pytestmark = pytest.mark.slow

PUSH_EVERY = "runtime.sync_interval_s=1"


def _dataset(tmp_path: Path, emulator) -> str:
    data = tmp_path / "tiny.zip"
    make_synthetic_dataset(data, classes=4, per_class=16, downstream_per_class=24, val_per_class=4, image_size=32)
    emulator.client().bucket(emulator.bucket).blob("data/tiny.zip").upload_from_filename(data)
    return f"gs://{emulator.bucket}/data/tiny.zip"


def _md5(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def _remote_md5s(emulator, prefix: str) -> dict[str, str]:
    blobs = emulator.client().bucket(emulator.bucket).list_blobs(prefix=prefix)
    return {blob.name.removeprefix(prefix): blob.md5_hash for blob in blobs}


def _mirror(cache: Path) -> Path:
    (local,) = [path for path in (cache / "runs").iterdir() if path.is_dir()]  # beside it: its .sync.json
    return local


def _scalars(event_file: Path) -> list[tuple[str, int, float]]:
    import tensorflow as tf

    values = []
    for event in tf.compat.v1.train.summary_iterator(str(event_file)):
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "scalars":
                values.append((value.tag, event.step, float(tf.make_ndarray(value.tensor))))
    return values


def test_pretrain_from_and_to_the_emulator_through_faults(tmp_path, gcs_emulator, flaky_proxy):
    data = _dataset(tmp_path, gcs_emulator)
    proxy = flaky_proxy(fail_rate=0.1, reset_rate=0.03, seed=3)
    output, cache = f"gs://{gcs_emulator.bucket}/runs/e2e", tmp_path / "cache"

    result = run_job(job_args("pretrain", data, output, cache, PUSH_EVERY))
    assert result.returncode == 0, result.stderr[-3000:]
    assert proxy.stats.injected_503 + proxy.stats.injected_resets > 0  # the faults did happen

    local = _mirror(cache)
    files = {p.relative_to(local).as_posix(): p for p in local.rglob("*") if p.is_file()}
    remote = _remote_md5s(gcs_emulator, "runs/e2e/")
    assert "model/backbone.keras" in files and "checkpoints/pretext/done.json" in files
    for name, path in files.items():
        assert remote.get(name) == _md5(path), f"{name} missing or different in the bucket"

    (event_name,) = [n for n in files if n.startswith("logs/pretext/events.out.tfevents")]
    downloaded = tmp_path / "events.remote"
    gcs_emulator.client().bucket(gcs_emulator.bucket).blob(f"runs/e2e/{event_name}").download_to_filename(
        downloaded
    )
    local_scalars = _scalars(files[event_name])
    assert local_scalars and _scalars(downloaded) == local_scalars


def test_killed_run_resumes_from_the_bucket_on_a_fresh_machine(tmp_path, gcs_emulator, flaky_proxy):
    data = _dataset(tmp_path, gcs_emulator)
    output = f"gs://{gcs_emulator.bucket}/runs/resume"
    bucket = gcs_emulator.client().bucket(gcs_emulator.bucket)  # straight to the emulator, not via the proxy
    # The bucket refuses the stage's completion marker, so the first run cannot finish however fast the
    # machine is; pushing four times a second, the kill lands mid-training on the machines seen so far.
    proxy = flaky_proxy()
    proxy.fail_pattern = b"done.json"
    overrides = ("runtime.sync_interval_s=0.25", "pretext.epochs=3", "pretext.steps_per_epoch=12")
    process = subprocess.Popen(
        job_args("pretrain", data, output, tmp_path / "first-machine", *overrides), cwd=REPO, env=job_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    index = "runs/resume/checkpoints/pretext/ckpt/checkpoint"
    deadline = time.monotonic() + 300
    while not bucket.blob(index).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, "the first run ended before a checkpoint reached the bucket"
    process.send_signal(signal.SIGKILL)
    process.wait()
    pushed = bucket.blob(index).download_as_text()
    step = int(pushed.splitlines()[0].split('"')[1].rsplit("-", 1)[1])
    assert not bucket.blob("runs/resume/checkpoints/pretext/done.json").exists()

    proxy.fail_pattern = None
    result = run_job(job_args("pretrain", data, output, tmp_path / "second-machine", *overrides))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Pulled" in result.stderr
    resumed = [line for line in result.stderr.splitlines() if "Resumed from" in line]
    assert resumed and int(resumed[0].rsplit("at step ", 1)[1]) >= step
    assert bucket.blob("runs/resume/checkpoints/pretext/done.json").exists()
    assert bucket.blob("runs/resume/model/backbone.keras").exists()


def test_a_job_on_an_output_another_live_job_holds_is_refused(tmp_path, gcs_emulator):
    """Before: two jobs on one --output overwrote each other object by object."""
    import json
    import os
    import socket

    data = _dataset(tmp_path, gcs_emulator)
    output = f"gs://{gcs_emulator.bucket}/runs/held"
    holder = {"run_id": "x", "job": None, "host": socket.gethostname(), "pid": os.getpid(), "ttl_s": 300.0}
    lease = gcs_emulator.client().bucket(gcs_emulator.bucket).blob("runs/held/lease.json")
    lease.upload_from_string(json.dumps(holder))  # this test's process: alive

    result = run_job(job_args("pretrain", data, output, tmp_path / "cache"))
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert output in line and "--take-over" in line
    assert json.loads(lease.download_as_text()) == holder  # the holder's lease is untouched
    assert [b.name for b in gcs_emulator.client().list_blobs(gcs_emulator.bucket, prefix="runs/held/")] == [
        "runs/held/lease.json"]
