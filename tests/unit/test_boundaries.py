"""Multi-worker ordering without a cluster: stage boundaries, the final push after a stop, the barrier's
errors, what a non-chief worker reuses, and the GPUs a task sees (fake clusters and syncers record calls)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import types
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from job.cli import _stage_boundary, main
from job.config import load_config
from job.layout import RunLayout
from tests.fakesync import FakeSync, use_fake_sync


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("TF_CONFIG", "CLUSTER_SPEC", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
                 "SLURM_JOB_ID", "SLURM_RESTART_COUNT", "CLOUD_ML_JOB_ID", "JOB_TEST_CHIEF_DELAY_S"):
        monkeypatch.delenv(name, raising=False)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


class FakeCluster:
    def __init__(self, calls: list[str], is_chief: bool, num_workers: int = 2):
        self.calls, self.is_chief, self.num_workers = calls, is_chief, num_workers
        self.worker_index = 0 if is_chief else 1
        self.gpus, self.has_gpu, self.kind, self.num_replicas = 0, False, "fake", num_workers

    def barrier(self, name: str) -> None:
        self.calls.append(f"barrier {name}")

    def leave(self) -> None:
        self.calls.append("leave")


@pytest.mark.parametrize("is_chief, expected", [
    (True, ["push", "barrier pretrain done"]),  # the chief publishes, then waits
    (False, ["barrier pretrain done", "pull"]),  # the others wait, then read what it published
])
def test_stage_boundary_order(is_chief, expected):
    calls: list[str] = []
    _stage_boundary(FakeCluster(calls, is_chief), FakeSync(calls), "pretrain")
    assert calls == expected


def test_one_worker_has_no_boundary():
    calls: list[str] = []
    _stage_boundary(FakeCluster(calls, True, num_workers=1), FakeSync(calls), "pretrain")
    assert calls == []


@pytest.mark.parametrize("is_chief, expected", [
    (True, ["pull", "barrier checks", "final push", "barrier final push", "leave"]),
    (False, ["pull", "barrier checks", "barrier final push", "leave"]),
])
def test_after_a_stop_no_worker_exits_before_the_chiefs_final_push(tmp_path, synth_zip, monkeypatch, is_chief,
                                                                     expected):
    """Before: the workers exited 143 right after saving, while the chief still pushed (a launcher that kills
    the rest at the first exit cut the push short)."""
    from job import distribute, stages, train

    calls: list[str] = []
    use_fake_sync(monkeypatch, tmp_path / "mirror", FakeSync(calls))
    monkeypatch.setattr(distribute, "make_cluster", lambda runtime: FakeCluster(calls, is_chief))

    def preempted(ctx) -> None:
        raise train.Preempted(7)

    def exit_now(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(stages, "pretrain", preempted)
    monkeypatch.setattr(os, "_exit", exit_now)
    monkeypatch.setattr(logging, "shutdown", lambda: None)
    args = ["pretrain", "--data", str(synth_zip), "--output", "gs://bucket/run", "--set",
            f"data.cache_dir={tmp_path / 'cache'}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 143, (result.output, result.exception)
    assert calls == expected


def test_a_non_chief_worker_reuses_a_run_it_finished_without_the_chiefs_done_json(tmp_path):
    """Before: it read done.json from its own mirror, where the chief's arrives only at the next boundary, and
    trained the run again while the chief skipped it."""
    from job.context import Context

    layout = RunLayout(tmp_path / "mirror")
    worker = Context(load_config("demo"), layout, tmp_path, types.SimpleNamespace(is_chief=False))
    run = layout.downstream("scratch", "finetune", 1.0, 0)
    assert worker.completed(run) is None
    worker.finish(run, {"val_accuracy": 0.75})
    assert not RunLayout.done(run).exists()  # the chief alone writes it
    assert worker.completed(run) == {"val_accuracy": 0.75}


def test_a_barrier_that_times_out_is_one_error_with_exit_code_5(monkeypatch):
    import tensorflow as tf

    from job import distribute
    from job.errors import ClusterError

    def times_out(barrier_id: str, timeout_ms: int) -> None:
        raise tf.errors.DeadlineExceededError(None, None, f"Barrier timed out: {barrier_id}")

    monkeypatch.setattr(distribute.eager_context, "context", lambda: types.SimpleNamespace(wait_at_barrier=times_out))
    cluster = distribute.Cluster(None, False, 1, 2, 0, "fake", barrier_timeout_s=2.0)
    expected = r"worker 1 waited at 'pretrain done' .*runtime.barrier_timeout_s = 2"
    with pytest.raises(ClusterError, match=expected) as err:
        cluster.barrier("pretrain done")
    assert err.value.exit_code == 5
    distribute.Cluster(None, True, 0, 1, 0, "single").barrier("anything")  # one worker: returns at once


def test_gpus_are_the_ones_the_task_sees(monkeypatch, caplog):
    from job import distribute

    monkeypatch.setattr(distribute.tf.config, "list_physical_devices", lambda kind: ["gpu0", "gpu1"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert distribute.visible_gpus() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,4")
    with caplog.at_level(logging.WARNING):
        assert distribute.visible_gpus() == 2
    assert "CUDA_VISIBLE_DEVICES=2,3,4 lists 3 device(s) but TensorFlow sees 2 GPU(s)" in caplog.text


def test_config_bounds_the_port_range():
    from job.errors import JobError

    with pytest.raises(JobError, match="passes the last port 65535"):
        load_config("demo", ["runtime.slurm_port_base=60000", "runtime.slurm_port_count=10000"])


