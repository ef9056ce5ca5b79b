"""Tests for job.rundir and the CLI around it: stale results are never reused, every check runs before the
output is touched, output-side faults are one-line errors, and --force applies once per job."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from job import rundir
from job.cli import main
from job.config import load_config
from job.errors import DiskFullError, JobError, StorageError, from_os_error
from job.layout import RunLayout
from tests.fakesync import FakeSync, use_fake_sync
from tests.jobproc import job_args, run_job

DEMO = "demo"
SMALL_MOUNT_BYTES = 1 << 20


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A single-process CPU cluster outside any scheduler, and the signal handlers restored afterwards."""
    for name in ("TF_CONFIG", "CLUSTER_SPEC", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
                 "SLURM_JOB_ID", "SLURM_RESTART_COUNT", "CLOUD_ML_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the CLI quiets h5py's disk-full noise through them
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def error_line(result: Result, code: int = 2) -> str:
    """The single `error: ...` line of a user-error exit with `code` (no traceback)."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    return errors[0]


def job_options(data: Path, out: Path, tmp_path: Path, *overrides: str) -> list[str]:
    args = ["--data", str(data), "--output", str(out), "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    for item in overrides:
        args += ["--set", item]
    return args


def completed_pretext(out: Path, data: Path, *overrides: str, fingerprint: bool = True) -> dict[Path, bytes]:
    """A run directory whose pretrain stage completed with these settings (fabricated: no training), and
    the bytes of every file in it."""
    layout = RunLayout(out)
    result = {"val_rotation_accuracy": 0.5, "epochs": 1}
    if fingerprint:
        config = load_config(DEMO, overrides)
        result[rundir.FINGERPRINT_KEY] = rundir.fingerprint(
            config, rundir.PRETRAIN, rundir.data_identity(str(data), data))
    files = {
        RunLayout.done(layout.pretext): json.dumps(result).encode(),
        layout.pretext / "history.json": b"[]",
        layout.backbone: b"a backbone",
        layout.config: b'{"previous": true}',
    }
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return files


def assert_intact(files: dict[Path, bytes]) -> None:
    for path, content in files.items():
        assert path.read_bytes() == content, path


# -- 1. a run directory never mixes two runs -------------------------------------------------------
@pytest.mark.parametrize(("override", "change"), [
    ("model.alpha=1.0", "model.alpha 0.35 → 1.0"),
    ("pretext.epochs=5", f"pretext.epochs {load_config(DEMO).pretext.epochs} → 5"),
])
def test_other_settings_on_a_completed_stage_are_refused(tmp_path, synth_zip, override, change):
    """Before: 'complete, skipping', exit 0, and config.json rewritten to the new settings."""
    out = tmp_path / "out"
    files = completed_pretext(out, synth_zip)
    line = error_line(invoke("pretrain", *job_options(synth_zip, out, tmp_path, override)))
    assert change in line and "checkpoints/pretext" in line and "--force" in line and "--output" in line
    assert_intact(files)


def test_torn_done_json_is_one_line_naming_the_fix(tmp_path, synth_zip):
    """Before: a JSONDecodeError traceback (exit 1) on every rerun."""
    out = tmp_path / "out"
    completed_pretext(out, synth_zip)
    done = RunLayout.done(RunLayout(out).pretext)
    done.write_bytes(b"")
    line = error_line(invoke("pretrain", *job_options(synth_zip, out, tmp_path)))
    assert f"{done} is empty or torn" in line and "delete it" in line and "--force" in line


def test_other_data_on_a_completed_stage_is_refused(tmp_path, synth_zip, synth_dir):
    """Before: --data was recorded nowhere; the other data's results were silently reused."""
    out = tmp_path / "out"
    files = completed_pretext(out, synth_zip)
    line = error_line(invoke("run", *job_options(synth_dir, out, tmp_path)))
    assert f"--data {synth_zip} → {synth_dir}" in line
    assert_intact(files)


def test_same_settings_reuse_and_settings_without_effect_too(tmp_path, synth_zip, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    completed_pretext(out, synth_zip)
    result = invoke("pretrain", *job_options(synth_zip, out, tmp_path, "runtime.log_every_steps=3",
                                             "data.decode_threads=1", "runtime.xla=on", "data.store=encoded",
                                             'data.downstream_wnids=["n01855672", "n01443537"]'))
    assert result.exit_code == 0, result.output
    assert "skipping (use --force to redo)" in caplog.text
    recorded = json.loads(RunLayout(out).run_record.read_text())
    assert recorded["data"] == {"uri": str(synth_zip.resolve()), "version": recorded["data"]["version"]}
    assert json.loads(RunLayout(out).config.read_text())["runtime"]["log_every_steps"] == 3


def test_legacy_results_without_fingerprint_are_reused(tmp_path, synth_zip, caplog):
    out = tmp_path / "out"
    completed_pretext(out, synth_zip, fingerprint=False)
    result = invoke("pretrain", *job_options(synth_zip, out, tmp_path, "model.alpha=1.0"))
    assert result.exit_code == 0, result.output
    assert "predates fingerprints" in caplog.text


def test_finish_writes_the_fingerprint_and_read_done_hides_it(tmp_path, synth_zip):
    from job.context import Context, read_done

    config, layout = load_config(DEMO), RunLayout(tmp_path)
    identity = rundir.data_identity(str(synth_zip), synth_zip)
    ctx = Context(config, layout, synth_zip, types.SimpleNamespace(is_chief=True), data_identity=identity)
    stage = layout.downstream("pretrained", "finetune", 1.0, 0)
    assert ctx.finish(stage, {"val_accuracy": 1.0}) == {"val_accuracy": 1.0}
    written = json.loads(RunLayout.done(stage).read_text())
    assert written[rundir.FINGERPRINT_KEY]["settings"]["finetune.epochs"] == config.finetune.epochs
    assert written[rundir.FINGERPRINT_KEY]["data"] == identity
    assert read_done(stage) == {"val_accuracy": 1.0}


def test_pretrain_fingerprint_leaves_out_downstream_and_no_effect_keys():
    keys = rundir.settings(load_config(DEMO), rundir.PRETRAIN)
    assert {"model.alpha", "pretext.epochs", "runtime.seed", "data.image_size"} <= keys.keys()
    assert not {"finetune.epochs", "data.cache_dir", "runtime.log_every_steps", "data.downstream_wnids",
                "data.store"} & keys.keys()


# -- 2. every check before anything is deleted or rewritten ----------------------------------------
@pytest.mark.parametrize("override", ['evaluate.depth_probe_layers=["block_99_add"]', "finetune.epochs=0"])
def test_force_with_a_bad_setting_deletes_nothing(tmp_path, synth_zip, override):
    """Before: --force deleted the completed stage and rewrote config.json, then failed."""
    out = tmp_path / "out"
    files = completed_pretext(out, synth_zip)
    line = error_line(invoke("run", "--force", *job_options(synth_zip, out, tmp_path, override)))
    assert override.partition("=")[0] in line
    assert_intact(files)


def test_imagenet_weights_without_network(tmp_path, synth_zip, monkeypatch):
    """Before: three chained URLError tracebacks, exit 1 (and --force had deleted the stage first)."""
    import functools
    from urllib.error import URLError

    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "urlretrieve", offline)
    monkeypatch.setattr(file_utils, "get_file",
                        functools.partial(file_utils.get_file, cache_dir=str(tmp_path / "keras")))
    out = tmp_path / "out"
    files = completed_pretext(out, synth_zip)
    line = error_line(invoke("run", "--force", *job_options(synth_zip, out, tmp_path, "model.weights=imagenet")))
    assert "model.weights = 'imagenet' could not be downloaded" in line and "URL fetch failure" in line
    assert_intact(files)


# -- 3. output-side faults -------------------------------------------------------------------------
def test_output_that_is_a_file(tmp_path, synth_zip):
    """Before: NotADirectoryError/FileExistsError traceback, exit 1."""
    out = tmp_path / "out"
    out.write_text("mine\n")
    line = error_line(invoke("run", *job_options(synth_zip, out, tmp_path)))
    assert f"--output {out} is a file" in line
    assert out.read_text() == "mine\n"


def test_output_under_a_file(tmp_path, synth_zip):
    """Before: NotADirectoryError traceback, exit 1."""
    parent = tmp_path / "notes.txt"
    parent.write_text("mine\n")
    line = error_line(invoke("run", *job_options(synth_zip, parent / "out", tmp_path)))
    assert f"lies under the file {parent}" in line
    assert parent.read_text() == "mine\n"


def test_output_in_an_unwritable_directory(tmp_path, synth_zip):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop writes")
        line = error_line(invoke("run", *job_options(synth_zip, locked / "out", tmp_path)))
        assert f"cannot use {locked} (Permission denied)" in line
    finally:
        locked.chmod(0o700)


def test_full_disk_is_one_line_with_its_own_exit_code(tmp_path, synth_zip, monkeypatch):
    """Before: OSError: [Errno 28] traceback, exit 1. (ENOSPC simulated: mounting a small tmpfs needs
    privileges a test cannot count on.)"""
    from job import stages

    def full(ctx):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(ctx.layout.pretext / "ckpt"))

    monkeypatch.setattr(stages, "pretrain", full)
    out = tmp_path / "out"
    files = completed_pretext(out, synth_zip)
    del files[RunLayout(out).config]  # rewritten: the run got as far as its first stage
    line = error_line(invoke("run", *job_options(synth_zip, out, tmp_path)), code=DiskFullError.exit_code)
    assert "no space left" in line and str(out / "checkpoints" / "pretext" / "ckpt") in line
    assert_intact(files)


def test_tensorflow_file_errors_are_recognised():
    import tensorflow as tf

    assert isinstance(from_os_error(tf.errors.ResourceExhaustedError(None, None, "ckpt: No space left on device")),
                      DiskFullError)
    assert from_os_error(tf.errors.PermissionDeniedError(None, None, "ckpt; Read-only file system")).exit_code == 2
    assert from_os_error(ValueError("No space left on device")) is None


# -- 4. --force once per job -----------------------------------------------------------------------
@pytest.mark.parametrize(("environ", "marker", "restart"), [
    ({}, {"job": "slurm:7"}, False),  # outside a scheduler --force always applies
    ({"SLURM_JOB_ID": "7"}, None, False),  # the first --force of the job
    ({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "0"}, {"job": "slurm:7"}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "2"}, {"job": "slurm:7"}, True),  # requeued
    ({"SLURM_JOB_ID": "8", "SLURM_RESTART_COUNT": "1"}, {"job": "slurm:7"}, False),  # another job
    ({"CLOUD_ML_JOB_ID": "123"}, {"job": "vertex:123"}, True),  # Vertex restarted the same custom job
    ({"CLOUD_ML_JOB_ID": "124"}, {"job": "vertex:123"}, False),  # a new scheduled run
])
def test_force_restart_decision(environ, marker, restart):
    assert rundir.is_restart(environ, marker) is restart


def test_force_clears_each_stage_once_per_job(tmp_path):
    """Before: every requeue of a `--force` job discarded the stage again and restarted it from step 0."""
    from job.context import Context

    layout = RunLayout(tmp_path)
    cluster = types.SimpleNamespace(is_chief=True)

    def context(environ: dict) -> Context:
        record = rundir.ForceRecord.load(layout, environ)
        return Context(load_config(DEMO), layout, tmp_path, cluster, force=True, force_record=record)

    old = RunLayout.done(layout.pretext)
    old.parent.mkdir(parents=True)
    old.write_text('{"old": true}')
    first = {"SLURM_JOB_ID": "7"}
    assert context(first).completed(layout.pretext) is None and not layout.pretext.exists()  # cleared
    progress = layout.pretext / "ckpt"
    progress.mkdir(parents=True)  # what the job trained before it was preempted
    requeued = {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "1"}
    assert context(requeued).completed(layout.pretext) is None and progress.is_dir()  # resumed, not cleared
    assert json.loads(layout.force_marker.read_text())["cleared"] == ["checkpoints/pretext"]
    assert context({"SLURM_JOB_ID": "9"}).completed(layout.pretext) is None and not progress.exists()


def test_force_starts_each_stage_s_tensorboard_logs_afresh(tmp_path):
    """Before: --force kept logs/pretext and logs/finetune/<run>: the redone stage's events beside the old ones,
    two points per step in TensorBoard."""
    from job.context import Context

    layout = RunLayout(tmp_path)
    run = layout.downstream("pretrained", "finetune", 1.0, 0)
    stages = (layout.pretext, run, layout.evaluate)
    logs = [layout.logs_of(stage) for stage in stages]
    assert logs == [tmp_path / "logs/pretext", tmp_path / "logs/finetune" / run.name, tmp_path / "logs/summary"]
    for stage, directory in zip(stages, logs):
        for path in (RunLayout.done(stage), directory / "events.out.tfevents.1.host.1.v2"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")
    context = Context(load_config(DEMO), layout, tmp_path, types.SimpleNamespace(is_chief=True), force=True)
    assert context.completed(layout.pretext) is None
    assert not logs[0].exists() and logs[1].is_dir()
    rundir.discard(layout, run)  # results of other settings that --force leaves behind (job/cli.py)
    assert not run.exists() and not logs[1].exists()
    assert context.completed(layout.evaluate) is None and not logs[2].exists()


def test_copying_a_run_keeps_its_fingerprints(tmp_path, synth_zip):
    """A run directory moved elsewhere is still the same run (the fingerprint names no output path)."""
    out = tmp_path / "out"
    completed_pretext(out, synth_zip)
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    rundir.check_reuse(RunLayout(moved), load_config(DEMO), rundir.data_identity(str(synth_zip), synth_zip),
                       ["pretrain"], force=False)


@pytest.fixture
def small_mount(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root with mount rights only; skipped elsewhere), unmounted afterwards."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_MOUNT_BYTES}", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_read_only_run_directory(tmp_path, synth_zip, small_mount):
    """Before: OSError: [Errno 30] Read-only file system traceback (writing config.json), exit 1."""
    out = small_mount / "out"
    files = completed_pretext(out, synth_zip)
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    line = error_line(invoke("pretrain", *job_options(synth_zip, out, tmp_path)))
    assert f"cannot use {out} (Read-only file system)" in line
    assert_intact(files)


@pytest.mark.slow
def test_disk_full_while_training(tmp_path, synth_zip, small_mount):
    """A real ENOSPC: pretraining on a 1 MiB file system fails at its first checkpoint, exit code 4.
    Before: a TensorFlow error traceback, exit 1; then exit 139 (HDF5's exit handler crashed on the weights
    file the full disk interrupted): a process of its own, as a user runs it, so the exit code is the real one."""
    out = small_mount / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    result = run_job(job_args("pretrain", synth_zip, out, tmp_path / "cache"))
    assert result.returncode == DiskFullError.exit_code, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: no space left")
    assert (out / "notes.txt").read_text() == "keep me\n"


def test_force_discards_results_of_other_settings_it_would_leave_behind(tmp_path, synth_zip):
    """Before (with fingerprints alone): `run --force --set finetune.seeds=1` after seeds=2 kept seed 1's old
    run, and every later run refused the directory (--force never touched seed 1 again)."""
    layout = RunLayout(tmp_path)
    data = rundir.data_identity(str(synth_zip), synth_zip)
    old, new = load_config(DEMO, ["finetune.seeds=2"]), load_config(DEMO, ["finetune.seeds=1"])
    seed1 = layout.downstream("pretrained", "finetune", 1.0, 1)
    seed1.mkdir(parents=True)
    RunLayout.done(seed1).write_text(json.dumps(
        {rundir.FINGERPRINT_KEY: rundir.fingerprint(old, rundir.DOWNSTREAM, data)}))
    completed_pretext(tmp_path, synth_zip)  # demo settings: unchanged by finetune.seeds
    assert rundir.stale_results(layout, new, data, ["pretrain", "finetune", "evaluate"], True) == [seed1]
    assert rundir.stale_results(layout, new, data, ["pretrain"], True) == [seed1]
    assert rundir.stale_results(layout, new, data, ["finetune"], False) == []
    with pytest.raises(JobError, match="finetune.seeds 2 → 1"):
        rundir.check_reuse(layout, new, data, ["finetune"], force=False)


# -- a failed final push does not replace the job's own error ------------------------------------------
def test_failed_final_sync_does_not_replace_the_preemption(tmp_path, synth_zip, monkeypatch, caplog):
    """Before: exit 3 with the sync's error; the preemption (exit 143) and its message were lost."""
    from job import stages, train

    failing = StorageError("Could not upload 1 of 1 file(s) to gs://bucket/run/ (first: done.json: HTTP 503)")
    use_fake_sync(monkeypatch, tmp_path / "mirror", FakeSync(close_error=failing))

    def preempted(ctx) -> None:
        raise train.Preempted(7)

    def exit_now(code: int) -> None:  # the CLI's os._exit after a preemption, as an exception the runner sees
        raise SystemExit(code)

    monkeypatch.setattr(stages, "pretrain", preempted)
    monkeypatch.setattr(os, "_exit", exit_now)
    monkeypatch.setattr(logging, "shutdown", lambda: None)  # it would close pytest's log capture
    result = invoke("pretrain", *job_options(synth_zip, "gs://bucket/run", tmp_path))  # type: ignore[arg-type]
    assert result.exit_code == 143, (result.output, result.exception)
    assert "preempted: stopped on request at step 7" in result.stderr
    assert "Final sync to gs://bucket/run failed: Could not upload" in caplog.text


def test_force_clears_the_stage_in_the_bucket_too(tmp_path):
    """Before: --force cleared only the local mirror; an interrupted forced run, rerun without --force, pulled
    the old done.json back from the bucket and skipped the stage."""
    from job.context import Context

    layout = RunLayout(tmp_path)
    cleared: list[Path] = []
    cluster = types.SimpleNamespace(is_chief=True)

    def context(environ: dict) -> Context:
        record = rundir.ForceRecord.load(layout, environ)
        return Context(load_config(DEMO), layout, tmp_path, cluster, force=True, force_record=record,
                       clear_remote=cleared.append)

    assert context({"SLURM_JOB_ID": "7"}).completed(layout.pretext) is None
    both = [layout.pretext, layout.logs_of(layout.pretext)]  # its results and its TensorBoard logs
    assert cleared == both
    context({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "1"}).completed(layout.pretext)
    assert cleared == both  # a requeue resumes: nothing cleared again
