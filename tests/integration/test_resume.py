"""Kill -9 after a checkpoint, restart: same final step and weights as an uninterrupted run, each step logged once;
SIGTERM: a checkpoint, then exit 143."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import tensorflow as tf

from job.layout import RunLayout
from job.synth import make_synthetic_dataset
from tests.jobproc import REPO, job_args, job_env, run_job
from tests.tbevents import events

pytestmark = pytest.mark.slow

# 24 steps: the kill lands after the first checkpoint (step 2) and well before the end.
OVERRIDES = ("pretext.epochs=2", "pretext.steps_per_epoch=12", "runtime.checkpoint_every_steps=2",
             "pretext.online_probe=true")


def _final_weights(output) -> dict[str, np.ndarray]:
    latest = tf.train.latest_checkpoint(str(RunLayout(output).pretext / "ckpt"))
    reader = tf.train.load_checkpoint(latest)
    names = [n for n in reader.get_variable_to_shape_map() if n.startswith("model/")]
    assert names
    return {n: reader.get_tensor(n) for n in names}


def test_killed_pretrain_resumes_to_the_same_weights(tmp_path):
    data = tmp_path / "data.zip"
    make_synthetic_dataset(data, classes=4, per_class=16, downstream_per_class=24, val_per_class=4, image_size=32)
    cache = tmp_path / "cache"

    reference = tmp_path / "reference"
    result = run_job(job_args("pretrain", data, reference, cache, *OVERRIDES))
    assert result.returncode == 0, result.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        job_args("pretrain", data, interrupted, cache, *OVERRIDES), cwd=REPO, env=job_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    index = RunLayout(interrupted).pretext / "ckpt" / "checkpoint"
    deadline = time.monotonic() + 300
    while not index.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = int(tf.train.latest_checkpoint(str(index.parent)).rsplit("-", 1)[1])
    assert not RunLayout.done(RunLayout(interrupted).pretext).exists()
    # As if the killed process had flushed events past its checkpoint: its event file replaced by the
    # uninterrupted run's, which logged the same steps (and all of them).
    logs = RunLayout(interrupted).tensorboard("pretext")
    for path in logs.glob("events.out.tfevents.*"):
        path.unlink()
    (logged,) = RunLayout(reference).tensorboard("pretext").glob("events.out.tfevents.*")
    shutil.copy(logged, logs / logged.name)

    result = run_job(job_args("pretrain", data, interrupted, cache, *OVERRIDES))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {killed_at}" in result.stderr

    done_reference = json.loads(RunLayout.done(RunLayout(reference).pretext).read_text())
    done_resumed = json.loads(RunLayout.done(RunLayout(interrupted).pretext).read_text())
    assert done_resumed["steps"] == done_reference["steps"]
    expected, actual = _final_weights(reference), _final_weights(interrupted)
    assert expected.keys() == actual.keys()
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-4, atol=1e-5, err_msg=name)
    history = json.loads((RunLayout(interrupted).pretext / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    # TensorBoard shows each step once: the killed process's events after its checkpoint are gone.
    resumed = events(logs)
    assert len(resumed) == len(set(resumed)), "a step logged twice"
    assert events(logs) == events(RunLayout(reference).tensorboard("pretext"))


def test_sigterm_checkpoints_and_exits_143(tmp_path):
    """Outside any scheduler: SIGTERM mid-epoch → a checkpoint after the current step → exit 143, no done.json."""
    data = tmp_path / "data.zip"
    make_synthetic_dataset(data, classes=4, per_class=16, downstream_per_class=24, val_per_class=4, image_size=32)
    output = tmp_path / "run"
    env = {k: v for k, v in job_env().items()
           if not k.startswith(("SLURM_", "CLOUD_ML_")) and k not in ("TF_CONFIG", "CLUSTER_SPEC")}
    log = tmp_path / "stderr.log"  # a file, not a pipe: nobody reads a pipe while the job trains
    with log.open("w") as stderr_file:
        process = subprocess.Popen(
            job_args("pretrain", data, output, tmp_path / "cache", *OVERRIDES), cwd=REPO, env=env,
            stdout=subprocess.DEVNULL, stderr=stderr_file,
        )
    index = RunLayout(output).pretext / "ckpt" / "checkpoint"
    deadline = time.monotonic() + 300
    while not index.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, "the run finished before it could be stopped"
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=300)
    stderr = log.read_text()
    assert process.returncode == 143, stderr[-3000:]
    stopped = re.search(r"Stop requested: checkpoint saved at step (\d+)", stderr)
    assert stopped, stderr[-3000:]
    step = int(stopped.group(1))
    assert 2 <= step < 24, step  # after the first checkpoint, before the end
    assert f"preempted: stopped on request at step {step} after saving a checkpoint; rerun the same command" in stderr
    assert "Traceback" not in stderr
    latest = tf.train.latest_checkpoint(str(index.parent))
    assert latest.endswith(f"ckpt-{step}")
    assert tf.train.load_checkpoint(latest).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == step
    assert not RunLayout.done(RunLayout(output).pretext).exists()
