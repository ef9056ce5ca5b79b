"""Run `python -m job` in a subprocess (a fresh TensorFlow per run, as a user would)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A few steps of everything: 32 px, alpha 0.35, tiny batches, one seed, the whole backbone with a random head.
TINY = (
    "data.image_size=32", "model.alpha=0.35", "model.stem_stride=1",
    "pretext.epochs=2", "pretext.batch_images=16", "pretext.warmup_epochs=0.5",
    "finetune.epochs=1", "finetune.min_steps=4", "finetune.batch_size=16", "finetune.seeds=1",
    "finetune.transfer_layers=['out_relu']", "finetune.head_init='random'",
    "evaluate.probe_steps=20", "evaluate.label_fractions=[0.5, 1.0]", "evaluate.report_examples=8",
    "runtime.checkpoint_every_steps=2", "runtime.log_every_steps=2",
)


def job_env(**extra: str) -> dict[str, str]:
    # TensorFlow's C++ lines are the job's to quiet (job/console.py), as for a user.
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_DETERMINISTIC_OPS="1")
    env.update(extra)
    return env


def job_args(command: str, data: Path | str, output: Path | str, cache: Path, *overrides: str) -> list[str]:
    args = [sys.executable, "-m", "job", command, "--data", str(data), "--output", str(output)]
    for item in (*TINY, f"data.cache_dir={cache}", *overrides):
        args += ["--set", item]
    return args


def run_job(args: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=job_env(**env), capture_output=True, text=True, timeout=timeout)


def free_ports(count: int) -> list[int]:
    """`count` loopback ports free right now (for the workers of a local multi-worker job)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until `path` exists (a checkpoint index, say) while `process` still runs; fail if it ended first."""
    deadline = time.monotonic() + timeout
    while not path.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, f"the process ended before {path} appeared"
    assert path.is_file(), f"no {path} after {timeout:.0f} s"

