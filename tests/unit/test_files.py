"""Issue 16: every artifact is written whole or not at all, and a torn JSON record is one line naming its fix."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest

from job import data as job_data
from job.data import load_dataset
from job.errors import JobError
from job.layout import RunLayout
from job.report import Examples, write_report
from tests.unit.test_report import metrics  # noqa: F401 - the fixture

HALF = b"half a file"


def _examples(size: int = 8) -> Examples:
    images = np.zeros((1, size, size, 3), np.uint8)
    return Examples(
        rotated_images=np.zeros((4, size, size, 3), np.uint8), rotation_true=np.array([0, 90, 180, 270]),
        rotation_predicted=np.array([0, 90, 180, 270]), val_images=images, val_true=np.array([0]),
        val_predicted=np.array([0]), class_names=["fish", "duck"], count=1,
    )


def test_report_interrupted_mid_figure_keeps_the_previous_files(tmp_path, monkeypatch, metrics):  # noqa: F811
    """Before: curves.png was left holding the half-written bytes (savefig wrote the final name in place)."""
    report = tmp_path / "report"
    write_report(report, metrics, _examples())
    before = {p.name: p.read_bytes() for p in report.iterdir()}

    def torn_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(HALF)
        raise SystemExit(143)  # a second stop signal

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", torn_savefig)
    with pytest.raises(SystemExit):
        write_report(report, metrics, _examples())
    assert {p.name: p.read_bytes() for p in report.iterdir()} == before  # no temp file left either


def _torn(path: Path, content: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("content", [b"", b'{"val_rotation_accuracy": 0.5, "ep'])
def test_torn_done_json_is_one_line_naming_the_fix(tmp_path, content):
    """Before: json.decoder.JSONDecodeError ('Expecting value: line 1 column 1') from read_done, on every rerun."""
    from job.context import read_done

    layout = RunLayout(tmp_path)
    done = _torn(RunLayout.done(layout.pretext), content)
    with pytest.raises(JobError) as info:
        read_done(layout.pretext)
    message = str(info.value)
    assert str(done) in message and "empty or torn" in message and "--force" in message
    assert "\n" not in message


def test_torn_history_json_is_one_line_naming_the_fix(tmp_path):
    """Before: JSONDecodeError from the trainer's history read (TrainState.load_history)."""
    from job.trainstate import HISTORY_FILE, TrainState

    history = _torn(tmp_path / HISTORY_FILE, b'[{"epoch": 1, "loss"')
    with pytest.raises(JobError, match="history.json is empty or torn") as info:
        TrainState.load_history(types.SimpleNamespace(directory=tmp_path, _restored=None), 1)
    assert str(history) in str(info.value) and "delete it" in str(info.value)


def test_torn_decode_cache_meta_is_one_line_naming_the_fix(tmp_path, synth_zip):
    """Before: JSONDecodeError from data._load_cache on every later run."""
    cache = tmp_path / "cache"
    load_dataset(synth_zip, 32, cache)
    (meta,) = cache.glob("decoded/*/meta.json")
    meta.write_bytes(b"")
    with pytest.raises(JobError, match="meta.json is empty or torn") as info:
        load_dataset(synth_zip, 32, cache)
    assert f"delete {meta.parent}" in str(info.value)


def test_decode_cache_meta_is_synced_before_it_is_published(tmp_path, synth_zip, monkeypatch):
    """Before: nothing was fsynced; a power loss could publish a cache with an empty meta.json."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    load_dataset(synth_zip, 32, tmp_path)
    assert any(s.endswith("/meta.json") for s in synced)
    assert any(s.endswith("/train_images.npy") for s in synced)


# -- transient read errors are not unreadable images ---------------------------------------------------------
@pytest.fixture
def eio_reads(monkeypatch):
    """Make reads of the first train image fail with EIO `failures` times (set on the returned namespace)."""
    monkeypatch.setattr(job_data, "READ_RETRY_DELAY_S", 0.0, raising=False)
    state = types.SimpleNamespace(failures=0, attempts=0, target=None)
    real = job_data._Tree.read

    def read(self, name: str) -> bytes:
        if state.target is None and name.startswith("train/"):
            state.target = name
        if name == state.target:
            state.attempts += 1
            if state.attempts <= state.failures:
                raise OSError(errno.EIO, os.strerror(errno.EIO), name)
        return real(self, name)

    monkeypatch.setattr(job_data._Tree, "read", read)
    return state


def test_a_transient_read_error_is_retried_and_the_image_kept(tmp_path, synth_zip, eio_reads):
    """Before: the image was dropped as 'unreadable' and the smaller set cached for good."""
    eio_reads.failures = 1
    dataset = load_dataset(synth_zip, 32, tmp_path, threads=1)
    assert eio_reads.attempts == 2
    assert dataset.skipped == [] and eio_reads.target in dataset.train.files


def test_a_persistent_read_error_fails_the_run_and_caches_nothing(tmp_path, synth_zip, eio_reads):
    """Before: load_dataset succeeded with one image fewer, listed as skipped, and cached that."""
    eio_reads.failures = 10**6  # every attempt
    with pytest.raises(JobError) as info:
        load_dataset(synth_zip, 32, tmp_path, threads=1)
    message = str(info.value)
    assert eio_reads.target in message and "Input/output error" in message and "\n" not in message
    assert eio_reads.attempts == job_data.READ_ATTEMPTS
    assert list((tmp_path / "decoded").iterdir()) == []  # no cache, no partial


# -- stale partial decodes ---------------------------------------------------------------------------------
def test_partials_of_dead_decodes_are_removed_and_live_ones_kept(tmp_path, synth_zip):
    """Before: both partial directories stayed in the cache for good."""
    decoded = tmp_path / "decoded"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = _torn(decoded / f"0123456789abcdef.partial-{host}-{int(dead.stdout)}-abcd1234" / "train_images.npy", HALF)
    live = _torn(decoded / f"0123456789abcdef.partial-{host}-{os.getpid()}-abcd1234" / "train_images.npy", HALF)
    old = _torn(decoded / "fedcba9876543210.partial-k2m4x9z1" / "train_images.npy", HALF)  # an earlier release's
    os.utime(old, (0, 0))
    os.utime(old.parent, (0, 0))
    load_dataset(synth_zip, 32, tmp_path)
    assert not stale.parent.exists() and not old.parent.exists()
    assert live.read_bytes() == HALF


def test_json_records_round_trip(tmp_path):
    from job.files import read_json, write_json

    path = tmp_path / "a" / "b.json"
    write_json(path, {"x": [1, 2]}, durable=True)
    assert read_json(path, "unused") == {"x": [1, 2]} == json.loads(path.read_text())
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]


# -- evaluate: the report before done.json -----------------------------------------------------------------
def test_evaluate_writes_the_report_before_done_json(tmp_path, monkeypatch):
    """Before: write_report ran after evaluate/done.json existed (a watcher of done.json read the old report)."""
    from job import stages
    from job.config import load_config
    from job.context import Context

    layout = RunLayout(tmp_path)
    _torn(RunLayout.done(layout.pretext), b'{"epochs": 1}')
    _torn(layout.backbone, b"a backbone")
    ctx = Context(load_config("demo"), layout, tmp_path, types.SimpleNamespace(is_chief=True))
    seen: list[bool] = []
    monkeypatch.setattr(stages.evaluations, "run_protocol", lambda ctx: {"linear_probe_val_accuracy": 0.9})
    monkeypatch.setattr(stages, "_examples", lambda ctx, done: None)
    monkeypatch.setattr(Context, "dataset_summary", lambda self: {})
    monkeypatch.setattr(stages.report, "build_metrics",
                        lambda pretext, done, data, entries: {"done": done, "timing": {}})
    monkeypatch.setattr(stages.report, "verdict_markdown", lambda values: "")
    monkeypatch.setattr(stages.summaries, "write_run_summary", lambda *args: None)
    monkeypatch.setattr(stages.report, "write_report",
                        lambda directory, values, examples, started: seen.append(
                            RunLayout.done(layout.evaluate).exists()))
    assert stages.evaluate(ctx) == {"done": {"linear_probe_val_accuracy": 0.9}, "timing": {}}
    assert seen == [False] and RunLayout.done(layout.evaluate).is_file()


# -- cache_key and safe_relpath (job.fetch, job.sync and job.data share them) ------------------------
def test_cache_key_is_a_short_stable_name_per_text():
    from job.files import CACHE_KEY_CHARS, cache_key

    key = cache_key("gs://bucket/runs/a")
    assert key == cache_key("gs://bucket/runs/a") and len(key) == CACHE_KEY_CHARS
    assert key != cache_key("gs://bucket/runs/b") and all(c in "0123456789abcdef" for c in key)


def test_safe_relpath_keeps_a_name_below_its_root():
    from job.files import safe_relpath

    assert safe_relpath("train/n01/a.JPEG").parts == ("train", "n01", "a.JPEG")
    for unsafe in ("", "/etc/passwd", "../up", "a/../../up", "a//b", "./a", "a/"):
        assert safe_relpath(unsafe) is None, unsafe
