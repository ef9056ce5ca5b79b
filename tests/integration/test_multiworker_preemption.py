"""Two workers (TF_CONFIG) writing to gs:// in the emulator are stopped, and a launcher kills the rest at the
first exit (as `srun --kill-on-bad-exit=1` and Vertex AI's restart do): the bucket still holds the checkpoint
of the step the workers stopped at.

The chief's final push is slowed by the JOB_TEST_CHIEF_DELAY_S test hook (job/testhooks.py), so that a
worker exiting before the push ends is certain, not a matter of timing.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest

from job.files import cache_key
from job.synth import make_synthetic_dataset
from tests.jobproc import REPO, free_ports, job_args, job_env

pytestmark = pytest.mark.slow

# Long enough that the stop lands mid-training after the first checkpoint (step 2); no periodic push: only
# the final push after the stop uploads the checkpoint.
OVERRIDES = ("pretext.epochs=2", "pretext.steps_per_epoch=16", "runtime.checkpoint_every_steps=2",
             "runtime.sync_interval_s=3600")
CHIEF_PUSH_DELAY_S = "5"
TIMEOUT_S = 420


def _latest_step(index_text: str) -> int:
    return int(re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', index_text, re.M).group(1))


def test_stopped_workers_leave_their_checkpoint_in_the_bucket(tmp_path, gcs_emulator):
    data = tmp_path / "data.zip"
    make_synthetic_dataset(data, classes=4, per_class=16, downstream_per_class=24, val_per_class=4, image_size=32)
    output = f"gs://{gcs_emulator.bucket}/runs/mw"
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes, logs = [], []
    for index in range(2):  # two machines: each its own cache (and mirror of the output)
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {k: v for k, v in job_env().items() if not k.startswith("SLURM_") and k != "CLUSTER_SPEC"}
        env.update(TF_CONFIG=json.dumps(tf_config), JOB_TEST_CHIEF_DELAY_S=CHIEF_PUSH_DELAY_S)
        logs.append(tmp_path / f"worker{index}.log")
        with logs[-1].open("w") as log:
            processes.append(subprocess.Popen(
                job_args("pretrain", data, output, tmp_path / f"machine{index}", *OVERRIDES), cwd=REPO, env=env,
                stdout=log, stderr=subprocess.STDOUT,
            ))
    key = cache_key(output)  # where open_output mirrors a gs:// output
    chief_index = tmp_path / "machine0" / "runs" / key / "checkpoints" / "pretext" / "ckpt" / "checkpoint"
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not chief_index.is_file():
            assert all(p.poll() is None for p in processes), "a worker ended before a checkpoint:\n" + \
                "\n".join(path.read_text()[-3000:] for path in logs)
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.2)
        for process in processes:  # the scheduler stops every task
            process.send_signal(signal.SIGTERM)
        # The launcher: at the first exit, kill the others.
        while all(p.poll() is None for p in processes):
            assert time.monotonic() < deadline, "the workers did not stop"
            time.sleep(0.05)
        first = next(i for i, p in enumerate(processes) if p.poll() is not None)
        for process in processes:
            if process.poll() is None:
                process.kill()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    chief = logs[0].read_text()
    stopped = re.search(r"Stop requested: checkpoint saved at step (\d+)", chief)
    assert stopped, chief[-4000:]
    step = int(stopped.group(1))
    assert processes[first].returncode == 143, (first, processes[first].returncode, logs[first].read_text()[-3000:])

    bucket = gcs_emulator.client().bucket(gcs_emulator.bucket)
    index = bucket.blob("runs/mw/checkpoints/pretext/ckpt/checkpoint")
    assert index.exists(), f"no checkpoint in the bucket; the stop was at step {step}:\n{chief[-3000:]}"
    assert _latest_step(index.download_as_text()) == step
    names = {b.name for b in bucket.list_blobs(prefix="runs/mw/checkpoints/pretext/ckpt/")}
    assert f"runs/mw/checkpoints/pretext/ckpt/ckpt-{step}.index" in names
    assert any(n.startswith(f"runs/mw/checkpoints/pretext/ckpt/ckpt-{step}.data-") for n in names)
    print(f"stopped at step {step}; worker {first} exited first; the bucket holds ckpt-{step}")
