"""slurm/train.sh on a real (local, single-node) Slurm cluster: two tasks = two MultiWorkerMirrored workers.

Needs `sbatch` and an idle node with at least 2 CPUs: `sudo bash slurm/local-cluster.sh` sets one up
(CI's .ci/run does); without it every test here is skipped with the reason. The script is submitted
unchanged; the command line only asks for two tasks on one node, no GPU and a log file in tmp_path.

JOB_PYTHON points at a small wrapper around `python -m job` that records, for every input pipeline the
job builds, which positions of each global batch it reads (job.pipelines.train_epochs' plans and
sharding): that is how the test sees each worker's half of every batch without changing the job.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job.layout import RunLayout
from job.synth import make_synthetic_dataset
from tests.jobproc import REPO, TINY, job_env

pytestmark = pytest.mark.slow

TRAIN_SH = REPO / "slurm" / "train.sh"
# Two workers on one node, one CPU each, no GPU (overrides the script's --ntasks-per-node=1 and --gpus-per-task=1;
# and its --mem-per-gpu, which Slurm refuses without GPUs: slurm/README.md).
TWO_WORKERS = ("--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-task=0",
               "--mem-per-gpu=0")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}
STEPS_PER_EPOCH = 5  # 80 train images / pretext.batch_images=16
# The requeue test: longer epochs (wrapping around the images), so that the stop, requested right after the
# first checkpoint (step 2), lands well inside the first epoch.
REQUEUE_STEPS_PER_EPOCH = 8
CHIEF_EXPORT_DELAY_S = 20  # JOB_TEST_CHIEF_DELAY_S (job/testhooks.py): the chief exports this much later

# `$JOB_PYTHON -m job ARGS`: record each input pipeline's slice of the global batches, then run the job.
RECORDER = '''#!{python}
import inspect, json, os, runpy, sys

import job.pipelines as pipelines

_original = pipelines.train_epochs
_signature = inspect.signature(_original)


def _recording(*args, **kwargs):
    bound = _signature.bind(*args, **kwargs)
    bound.apply_defaults()
    plans, epochs, sharding = bound.arguments["plans"], bound.arguments["epochs"], bound.arguments["sharding"]
    with open(os.path.join(os.environ["SHARD_LOG_DIR"], "shards.jsonl"), "a") as handle:
        for epoch in epochs:  # the fit's one pipeline reads these epochs, the first from start_step
            plan = plans(epoch)
            start = int(bound.arguments["start_step"]) if epoch == epochs.start else 0
            part = sharding.slice(plan.indices.shape[1])
            record = {{
                "procid": int(os.environ.get("SLURM_PROCID", "-1")), "pid": os.getpid(),
                "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                "pipeline": sharding.pipeline_id, "pipelines": sharding.num_pipelines,
                "epoch": epoch, "start_step": start,
                "global": plan.indices[start:].tolist(), "mine": plan.indices[start:, part].tolist(),
                "positions": [part.start, part.stop],
            }}
            handle.write(json.dumps(record) + "\\n")
    return _original(*args, **kwargs)


pipelines.train_epochs = _recording
os.environ["JOB_ALLOCATOR"] = "recorder"  # no re-exec under tcmalloc (job/allocator.py): it would drop this wrapper
if sys.argv[1:3] != ["-m", "job"]:
    sys.exit("usage: recorder -m job ARGS")
sys.argv = ["job", *sys.argv[3:]]
runpy.run_module("job", run_name="__main__", alter_sys=True)
'''


def _slurm_unavailable() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return "sbatch is not on PATH: start the local cluster with `sudo bash slurm/local-cluster.sh`"
    try:
        nodes = subprocess.run(["sinfo", "-h", "-o", "%T %c"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo failed ({err}): start the local cluster with `sudo bash slurm/local-cluster.sh`"
    usable = [line.split() for line in nodes.stdout.splitlines() if line.split()[:1] and
              line.split()[0].rstrip("*~#") in {"idle", "mixed"}]
    if nodes.returncode or not usable:
        return (f"no idle Slurm node (sinfo: {(nodes.stdout + nodes.stderr).strip() or 'nothing'}): "
                "start the local cluster with `sudo bash slurm/local-cluster.sh`")
    if max(int(cpus) for _, cpus in usable) < 2:
        return "the Slurm nodes have fewer than 2 CPUs: two tasks cannot run on one node"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    if reason := _slurm_unavailable():
        pytest.skip(reason)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slurm_data") / "data.zip"
    make_synthetic_dataset(path, classes=4, per_class=16, downstream_per_class=24, val_per_class=4, image_size=32)
    return path


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (the Slurm resolver gives task i of a node port_base + i)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("", 0))
            base = probe.getsockname()[1]
        if base >= 65535:
            continue
        try:
            with socket.socket() as first, socket.socket() as second:
                first.bind(("", base))
                second.bind(("", base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


class SlurmJob:
    """One submission of slurm/train.sh; cancelled at the end of the test if it is still there."""

    def __init__(self, tmp: Path, data: Path, epochs: int, name: str, overrides: tuple[str, ...] = (),
                 command: str = "pretrain", extra_env: dict[str, str] | None = None,
                 fractions: str = "[0.5, 1.0]"):
        self.tmp, self.output = tmp, tmp / "run"
        self.shards = tmp / "shards"
        self.shards.mkdir()
        recorder = tmp / "recorder"
        recorder.write_text(RECORDER.format(python=sys.executable))
        recorder.chmod(0o755)
        sections = ("data", "model", "pretext", "runtime") if command == "pretrain" else ("",)
        # (evaluate.label_fractions holds a space: it comes as the extra argument below)
        tiny = [item for item in TINY if item.startswith(sections) and " " not in item]
        # Ports: exactly the free pair (a range of one block: job/slurm.py derives nothing else from the job id).
        overrides = [*tiny, f"pretext.epochs={epochs}", *overrides, f"data.cache_dir={tmp / 'cache'}",
                     f"runtime.slurm_port_base={_free_port_pair()}", "runtime.slurm_port_count=2"]
        assert not any(" " in item for item in overrides)  # JOB_SET is split on spaces
        env = {k: v for k, v in job_env().items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k not in ("TF_CONFIG", "CLUSTER_SPEC")}
        env.update(JOB_PYTHON=str(recorder), JOB_COMMAND=command, JOB_DATA=str(data), JOB_OUTPUT=str(self.output),
                   JOB_SET=" ".join(overrides), SHARD_LOG_DIR=str(self.shards), **(extra_env or {}))
        command = ["sbatch", "--parsable", *TWO_WORKERS, f"--job-name=test-{name}", "--time=00:20:00",
                   f"--output={tmp}/slurm-%j.out", str(TRAIN_SH),
                   # an extra argument passed through to the job (one with a space, which JOB_SET cannot hold)
                   "--set", f"evaluate.label_fractions={fractions}"]
        submitted = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert submitted.returncode == 0, submitted.stderr
        self.id = int(submitted.stdout.strip().split(";")[0])
        self.log_path = tmp / f"slurm-{self.id}.out"

    def info(self) -> dict[str, str]:
        shown = subprocess.run(["scontrol", "-o", "show", "job", str(self.id)], capture_output=True, text=True,
                               timeout=30)
        assert shown.returncode == 0, shown.stderr
        return dict(item.split("=", 1) for item in shown.stdout.split() if "=" in item)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait(self, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (info := self.info())["JobState"] not in TERMINAL:
            if time.monotonic() > deadline:
                self.cancel()
                pytest.fail(f"job {self.id} still {info['JobState']} after {timeout:.0f} s:\n{self.log()[-6000:]}")
            time.sleep(2)
        return info

    def cancel(self) -> None:
        subprocess.run(["scancel", str(self.id)], capture_output=True, timeout=30)

    def records(self) -> list[dict]:
        path = self.shards / "shards.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def submit(slurm, data, tmp_path):
    jobs: list[SlurmJob] = []

    def start(epochs: int, name: str, *overrides: str, **options) -> SlurmJob:
        jobs.append(SlurmJob(tmp_path, data, epochs, name, overrides, **options))
        return jobs[-1]

    yield start
    for job in jobs:
        job.cancel()


def _task_lines(log: str, task: int) -> list[str]:
    """Lines of one task (srun --label prefixes them with 'N: ')."""
    return [line.split(": ", 1)[1] for line in log.splitlines() if line.startswith(f"{task}: ")]


def _assert_two_workers(log: str) -> None:
    chief, worker = "\n".join(_task_lines(log, 0)), "\n".join(_task_lines(log, 1))
    assert "multi-worker (Slurm): task worker/0, 2 workers, chief=True" in chief, log[-6000:]
    assert "multi-worker (Slurm): task worker/1, 2 workers, chief=False" in worker, log[-6000:]
    for lines in (chief, worker):
        assert re.search(r"pretrain: .* 2 replicas \(multi-worker \(Slurm\)\)", lines), log[-6000:]


def _assert_disjoint_halves(records: list[dict], procids: set[int]) -> None:
    """Per (epoch, start): the two workers read complementary halves, by position, of the same global batches."""
    by_epoch: dict[tuple[int, int, int], dict[int, dict]] = {}
    for record in records:
        by_epoch.setdefault((record["restart"], record["epoch"], record["start_step"]), {})[record["procid"]] = record
    assert by_epoch, "the job built no input pipeline"
    for key, workers in by_epoch.items():
        assert set(workers) == procids, (key, sorted(workers))
        first, second = workers[0], workers[1]
        assert (first["pipeline"], second["pipeline"]) == (0, 1)
        assert first["pipelines"] == second["pipelines"] == 2
        assert first["global"] == second["global"], f"{key}: the workers planned different global batches"
        for step, (row, mine, theirs) in enumerate(zip(first["global"], first["mine"], second["mine"])):
            assert len(mine) == len(theirs) == len(row) // 2, (key, step)
            assert mine + theirs == row, f"{key} step {step}: halves {mine} + {theirs} != global batch {row}"
            if len(set(row)) == len(row):  # no weight-0 padding repeats
                assert not set(mine) & set(theirs), (key, step)


def _events_files(output: Path) -> list[Path]:
    return sorted((output / "logs").rglob("events.out.tfevents.*"))


def test_usr1_checkpoints_requeues_and_resumes(submit):
    started = time.monotonic()
    epochs, steps_per_epoch = 2, REQUEUE_STEPS_PER_EPOCH
    job = submit(epochs, "requeue", f"pretext.steps_per_epoch={steps_per_epoch}")
    index = RunLayout(job.output).pretext / "ckpt" / "checkpoint"
    deadline = time.monotonic() + 300
    while not index.is_file():
        state = job.info()["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job.id} {state} before a checkpoint:\n" \
                                                              f"{job.log()[-6000:]}"
        assert time.monotonic() < deadline, f"no checkpoint after 300 s:\n{job.log()[-6000:]}"
        time.sleep(0.5)
    # What Slurm sends 120 s before the time limit (--signal=B:USR1@120), now: to the batch shell only.
    signalled = subprocess.run(["scancel", "--signal=USR1", "--batch", str(job.id)], capture_output=True, text=True,
                               timeout=30)
    assert signalled.returncode == 0, signalled.stderr

    info = job.wait(timeout=600)
    log = job.log()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info["JobState"], log[-6000:])
    assert int(info["Restarts"]) >= 1, log[-6000:]
    assert "SLURM_RESTART_COUNT=1" in log and "requeueing job" in log, log[-6000:]

    chief = "\n".join(_task_lines(log, 0))
    stopped = re.search(r"Stop requested: checkpoint saved at step (\d+)", chief)
    assert stopped, log[-6000:]
    step = int(stopped.group(1))
    assert re.search(rf"Resumed from \S+ckpt-{step} at step {step}\b", chief), log[-6000:]
    assert "preempted: " in chief and "rerun the same command to resume" in chief
    _assert_two_workers(log)

    layout = RunLayout(job.output)
    history = json.loads((layout.pretext / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    done = json.loads(RunLayout.done(layout.pretext).read_text())
    assert done["steps"] == epochs * steps_per_epoch and done["epochs"] == epochs

    # Each worker read its half of every batch, before and after the requeue; the resumed epoch continued
    # with exactly the batches the first run had planned for its remaining steps.
    records = job.records()
    _assert_disjoint_halves(records, {0, 1})
    epoch, begin = divmod(step, steps_per_epoch)
    resumed = [r for r in records if r["restart"] >= 1 and r["procid"] == 0]
    assert (resumed[0]["epoch"], resumed[0]["start_step"]) == (epoch, begin), resumed[0]
    planned = [r for r in records if r["restart"] == 0 and r["procid"] == 0 and r["epoch"] == epoch]
    if planned:  # the first run had begun this epoch: the rest of it is the same batches
        assert resumed[0]["global"] == planned[0]["global"][begin - planned[0]["start_step"]:]
    chief_pids = {r["pid"] for r in records if r["procid"] == 0}
    events = _events_files(job.output)
    assert len(events) == 2 and all(any(f".{pid}." in e.name for pid in chief_pids) for e in events), events
    print(f"USR1 → checkpoint at step {step} → requeue → resume → done: {time.monotonic() - started:.0f} s")


def test_two_tasks_run_every_stage_as_one_multi_worker_job(submit):
    """Two Slurm tasks train as one job through every stage: each reads its half of every global batch, only the
    chief writes the shared artifacts, and the worker, reaching the end of pretraining 20 s before the chief has
    exported the backbone (a test hook delays the chief), waits at the stage boundary instead of failing."""
    started = time.monotonic()
    # The fewest downstream trainings: the fine-tuned classifier, reused at label fraction 1.0, no scratch run.
    job = submit(1, "all-stages", "evaluate.scratch_baseline=false", command="run", fractions="[1.0]",
                 extra_env={"JOB_TEST_CHIEF_DELAY_S": str(CHIEF_EXPORT_DELAY_S)})
    info = job.wait(timeout=1200)
    log = job.log()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info["JobState"], log[-6000:])
    _assert_two_workers(log)

    # One pretext epoch, each worker reading its half of every batch.
    records = job.records()
    _assert_disjoint_halves(records, {0, 1})
    assert {r["epoch"] for r in records} == {0}
    layout = RunLayout(job.output)
    done = json.loads(RunLayout.done(layout.pretext).read_text())
    assert done["steps"] == STEPS_PER_EPOCH and done["epochs"] == 1
    assert [h["epoch"] for h in json.loads((layout.pretext / "history.json").read_text())] == [1]

    # One set of shared artifacts, the chief's: its exports, its TensorBoard files, no per-worker copies.
    exports = {p.name for p in layout.export.iterdir()}
    assert {"backbone.keras", "rotation_model.keras", "rotation_savedmodel"} <= exports, exports
    keras_files = sorted(p.relative_to(job.output).as_posix() for p in job.output.rglob("*.keras"))
    assert all(name.startswith("model/") and name.count("/") == 1 for name in keras_files), keras_files
    chief_pid = next(r["pid"] for r in records if r["procid"] == 0)
    events = _events_files(job.output)
    assert events and all(f".{chief_pid}." in e.name for e in events), events
    assert len([e for e in events if layout.tensorboard("pretext") in e.parents]) == 1, events
    assert not [p for p in job.output.rglob("*") if "worker" in p.name], "a worker wrote into the run directory"

    # The worker waited for the chief's exports, and the run ended cleanly.
    chief, worker = "\n".join(_task_lines(log, 0)), "\n".join(_task_lines(log, 1))
    assert "the chief waits 20 s before the pretrain exports" in chief, log[-6000:]
    for lines in (chief, worker):
        assert "== evaluate ==" in lines, log[-6000:]
    assert "is missing" not in log, log[-6000:]
    # A clean shutdown: no task reports another as crashed or unreachable.
    for text in ("CoordinationServiceError", "have crashed", "Failed to send RPC", "Traceback"):
        assert text not in log, log[-6000:]
    assert layout.metrics.is_file() and layout.classifier.is_file()
    assert RunLayout.done(layout.evaluate).is_file()
    print(f"run, two workers, chief's export delayed {CHIEF_EXPORT_DELAY_S} s: {time.monotonic() - started:.0f} s")
