"""The tf.distribute strategy, chosen in one place from the environment.

- TF_CONFIG, or Vertex AI's CLUSTER_SPEC → MultiWorkerMirroredStrategy (TFConfigClusterResolver);
- a Slurm job step with several tasks → MultiWorkerMirroredStrategy (SlurmClusterResolver);
- several local GPUs → MirroredStrategy; one GPU → OneDeviceStrategy("/gpu:0"); else the CPU.
Only the chief writes shared artifacts; other workers write checkpoints to throw-away directories.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

log = logging.getLogger(__name__)


@dataclass
class Cluster:
    strategy: tf.distribute.Strategy
    is_chief: bool
    worker_index: int
    num_workers: int
    has_gpu: bool
    kind: str  # "single", "mirrored", "multi-worker (TF_CONFIG)", "multi-worker (Slurm)"

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def writable_dir(self, path: Path) -> Path:
        """`path` on the chief; a private temporary directory on other workers (TF needs them to save too)."""
        if self.is_chief:
            path.mkdir(parents=True, exist_ok=True)
            return path
        return Path(tempfile.mkdtemp(prefix=f"worker{self.worker_index}-"))


def vertex_tf_config() -> str | None:
    """Translate Vertex AI's CLUSTER_SPEC (workerpool0 = chief, workerpool1 = workers) into TF_CONFIG."""
    spec = os.environ.get("CLUSTER_SPEC")
    if not spec:
        return None
    parsed = json.loads(spec)
    pools = parsed["cluster"]
    cluster = {}
    if pools.get("workerpool0"):
        cluster["chief"] = pools["workerpool0"]
    if pools.get("workerpool1"):
        cluster["worker"] = pools["workerpool1"]
    task = parsed["task"]
    kind = "chief" if task["type"] == "workerpool0" else "worker"
    return json.dumps({"cluster": cluster, "task": {"type": kind, "index": task["index"]}})


def _slurm_multi_task() -> bool:
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))) > 1 and bool(
        os.environ.get("SLURM_PROCID")
    )


def _slurm_tasks_per_node() -> int:
    """The most tasks this job step runs on one node (SLURM_STEP_TASKS_PER_NODE looks like "2(x3),1")."""
    spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE") or "1"
    return max(int(part.split("(")[0]) for part in spec.split(","))


def make_cluster(slurm_port_base: int = 8888) -> Cluster:
    """Build the strategy this process should train under."""
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if "TF_CONFIG" not in os.environ and (translated := vertex_tf_config()):
        os.environ["TF_CONFIG"] = translated
    if "TF_CONFIG" in os.environ:
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        return _multi_worker(resolver, bool(gpus), "multi-worker (TF_CONFIG)")
    if _slurm_multi_task():
        # Slurm gives each task its GPUs (--gpus-per-task) and auto_set_gpu=False leaves them alone; the resolver
        # still puts at most gpus_per_node / gpus_per_task tasks on a node (and fails on 0 GPUs): one slot per task.
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
            port_base=slurm_port_base, gpus_per_node=_slurm_tasks_per_node(), gpus_per_task=1, auto_set_gpu=False
        )
        return _multi_worker(resolver, bool(gpus), "multi-worker (Slurm)")
    if len(gpus) > 1:
        return Cluster(tf.distribute.MirroredStrategy(), True, 0, 1, True, "mirrored")
    device = "/gpu:0" if gpus else "/cpu:0"
    return Cluster(tf.distribute.OneDeviceStrategy(device), True, 0, 1, bool(gpus), "single")


def _multi_worker(resolver, has_gpu: bool, kind: str) -> Cluster:
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.AUTO
    )
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver, communication_options=options)
    task_type, task_id = resolver.task_type, resolver.task_id or 0
    cluster_spec = resolver.cluster_spec().as_dict()
    num_workers = sum(len(v) for v in cluster_spec.values()) if cluster_spec else 1
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in cluster_spec)
    index = task_id + (1 if task_type == "worker" and "chief" in cluster_spec else 0)
    log.info("%s: task %s/%s, %d workers, chief=%s", kind, task_type, task_id, num_workers, is_chief)
    return Cluster(strategy, is_chief, index, num_workers, has_gpu, kind)
