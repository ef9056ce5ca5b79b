"""runtime.deterministic: two identical runs, and a run killed with -9 after a checkpoint and restarted, end
with bit-identical weights and validation history, each step logged once; SIGTERM: a checkpoint, then exit 143."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from job.layout import RunLayout
from job.synth import make_synthetic_dataset
from tests.jobproc import REPO, job_args, job_env, run_job, wait_for_file
from tests.tbevents import events

pytestmark = pytest.mark.slow

# 12 steps: the kill lands after the first checkpoint (step 2) and well before the end. 24 images (96 samples)
# a step and SGD at 0.1: without runtime.deterministic, two such runs already differed in the first epoch.
OVERRIDES = ("pretext.epochs=2", "pretext.steps_per_epoch=6", "pretext.batch_images=24",
             "pretext.optimizer='sgd'", "pretext.learning_rate=0.1", "runtime.checkpoint_every_steps=2",
             "pretext.online_probe=true", "runtime.deterministic=true")
TOTAL_STEPS = 12
VAL_KEYS = ("rotation_accuracy", "online_probe_accuracy")


def _final_state(output) -> dict[str, np.ndarray]:
    """Every tensor of the last checkpoint: the model's weights, the optimizer's state, the step."""
    latest = tf.train.latest_checkpoint(str(RunLayout(output).pretext / "ckpt"))
    reader = tf.train.load_checkpoint(latest)
    names = [n for n in reader.get_variable_to_shape_map() if not n.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")]
    assert any(n.startswith("model/") for n in names)
    return {n: reader.get_tensor(n) for n in names}


def _history(output) -> list[dict]:
    return json.loads((RunLayout(output).pretext / "history.json").read_text())


def _assert_identical(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("deterministic")
    data = root / "data.zip"
    make_synthetic_dataset(data, classes=4, per_class=16, downstream_per_class=24, val_per_class=4, image_size=32)
    output = root / "reference"
    result = run_job(job_args("pretrain", data, output, root / "cache", *OVERRIDES))
    assert result.returncode == 0, result.stderr[-3000:]
    return data, root / "cache", output


def test_two_identical_runs_are_bit_identical(reference, tmp_path):
    data, cache, first = reference
    second = tmp_path / "second"
    result = run_job(job_args("pretrain", data, second, cache, *OVERRIDES))
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_identical(_final_state(second), _final_state(first))
    drop = "epoch_seconds"
    assert [{k: v for k, v in h.items() if k != drop} for h in _history(second)] == [
        {k: v for k, v in h.items() if k != drop} for h in _history(first)]


def test_killed_pretrain_resumes_to_the_same_weights(reference, tmp_path):
    data, cache, first = reference
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        job_args("pretrain", data, interrupted, cache, *OVERRIDES), cwd=REPO, env=job_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    index = RunLayout(interrupted).pretext / "ckpt" / "checkpoint"
    wait_for_file(index, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = int(tf.train.latest_checkpoint(str(index.parent)).rsplit("-", 1)[1])
    assert not RunLayout.done(RunLayout(interrupted).pretext).exists()
    # As if the killed process had flushed events past its checkpoint: its event file replaced by the
    # uninterrupted run's, which logged the same steps (and all of them).
    logs = RunLayout(interrupted).tensorboard("pretext")
    for path in logs.glob("events.out.tfevents.*"):
        path.unlink()
    (logged,) = RunLayout(first).tensorboard("pretext").glob("events.out.tfevents.*")
    shutil.copy(logged, logs / logged.name)

    result = run_job(job_args("pretrain", data, interrupted, cache, *OVERRIDES))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {killed_at}" in result.stderr

    done_reference = json.loads(RunLayout.done(RunLayout(first).pretext).read_text())
    done_resumed = json.loads(RunLayout.done(RunLayout(interrupted).pretext).read_text())
    assert done_resumed["steps"] == done_reference["steps"]
    _assert_identical(_final_state(interrupted), _final_state(first))
    # The validation metrics too (the train metrics of the epoch it was killed in cover the resumed steps only).
    history = _history(interrupted)
    assert [h["epoch"] for h in history] == [1, 2]
    assert [[h[k] for k in VAL_KEYS] for h in history] == [[h[k] for k in VAL_KEYS] for h in _history(first)]
    # TensorBoard shows each step once: the killed process's events after its checkpoint are gone.
    resumed = events(logs)
    assert len(resumed) == len(set(resumed)), "a step logged twice"
    assert resumed == events(RunLayout(first).tensorboard("pretext"))


def test_sigterm_checkpoints_and_exits_143(reference, tmp_path):
    """Outside any scheduler: SIGTERM mid-epoch → a checkpoint after the current step → exit 143, no done.json."""
    data, cache, _ = reference
    output = tmp_path / "run"
    env = {k: v for k, v in job_env().items()
           if not k.startswith(("SLURM_", "CLOUD_ML_")) and k not in ("TF_CONFIG", "CLUSTER_SPEC")}
    log = tmp_path / "stderr.log"  # a file, not a pipe: nobody reads a pipe while the job trains
    with log.open("w") as stderr_file:
        process = subprocess.Popen(
            job_args("pretrain", data, output, cache, *OVERRIDES), cwd=REPO, env=env,
            stdout=subprocess.DEVNULL, stderr=stderr_file,
        )
    index = RunLayout(output).pretext / "ckpt" / "checkpoint"
    wait_for_file(index, process)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=300)
    stderr = log.read_text()
    assert process.returncode == 143, stderr[-3000:]
    stopped = re.search(r"Stop requested: checkpoint saved at step (\d+)", stderr)
    assert stopped, stderr[-3000:]
    step = int(stopped.group(1))
    assert 2 <= step < TOTAL_STEPS, step  # after the first checkpoint, before the end
    assert f"preempted: stopped on request at step {step} after saving a checkpoint; rerun the same command" in stderr
    assert "Traceback" not in stderr
    latest = tf.train.latest_checkpoint(str(index.parent))
    assert latest.endswith(f"ckpt-{step}")
    assert tf.train.load_checkpoint(latest).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == step
    assert not RunLayout.done(RunLayout(output).pretext).exists()
