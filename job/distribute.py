"""The tf.distribute strategy, chosen in one place from the environment.

- TF_CONFIG, or Vertex AI's CLUSTER_SPEC → MultiWorkerMirroredStrategy (TFConfigClusterResolver);
- a Slurm job step with several tasks → MultiWorkerMirroredStrategy over the workers in Slurm's task order
  (job/slurm.py), on ports derived from the job id;
- several local GPUs → MirroredStrategy; one GPU → OneDeviceStrategy("/gpu:0"); else the CPU.
Each worker uses the GPUs it sees; workers all-reduce over NCCL when they have GPUs, over rings otherwise.
Only the chief writes shared artifacts; other workers write checkpoints to throw-away directories.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import tensorflow as tf
from tensorflow.python.eager import context as eager_context

from job.config import RuntimeConfig
from job.errors import ClusterError
from job.slurm import SlurmTask, slurm_task

log = logging.getLogger(__name__)

MS_PER_S = 1000
LEFT_KEY = "job/left"  # coordination-service keys: worker N passed the last barrier and exits
LEAVE_TIMEOUT_S = 60.0  # how long the chief waits for those keys before exiting anyway


@dataclass
class Cluster:
    strategy: tf.distribute.Strategy
    is_chief: bool
    worker_index: int
    num_workers: int
    gpus: int  # GPUs of this worker
    kind: str  # "single", "mirrored", "multi-worker (TF_CONFIG)", "multi-worker (Slurm)"
    barrier_timeout_s: float = RuntimeConfig.barrier_timeout_s
    _barriers: int = field(default=0, repr=False)

    @property
    def has_gpu(self) -> bool:
        return self.gpus > 0

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def writable_dir(self, path: Path) -> Path:
        """`path` on the chief; a private temporary directory on other workers (TF needs them to save too)."""
        if self.is_chief:
            path.mkdir(parents=True, exist_ok=True)
            return path
        return Path(tempfile.mkdtemp(prefix=f"worker{self.worker_index}-"))

    def barrier(self, name: str) -> None:
        """Return once every worker got here (the coordination service's barrier); at once with one worker.

        Every worker calls the same barriers in the same order (their ids are numbered)."""
        if self.num_workers <= 1:
            return
        self._barriers += 1
        barrier_id = f"{name}-{self._barriers}"
        log.debug("barrier %s: waiting for %d workers", barrier_id, self.num_workers)
        try:
            # The public API has no barrier; MultiWorkerMirroredStrategy set up the coordination service.
            eager_context.context().wait_at_barrier(barrier_id, int(self.barrier_timeout_s * MS_PER_S))
        except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError, tf.errors.AbortedError) as err:
            raise ClusterError(
                f"worker {self.worker_index} waited at '{name}' for the other workers and gave up "
                f"({type(err).__name__}): read the other tasks' logs (task 0 is the chief), or raise "
                f"runtime.barrier_timeout_s = {self.barrier_timeout_s:g} if its exports and pushes take longer."
            ) from None

    def leave(self) -> None:
        """After the last barrier: the chief, which hosts the coordination service, exits only once every other
        worker has its answer (else a worker can lose it with the chief gone, and fail). Errors are logged only:
        every worker got past the barrier already."""
        if self.num_workers <= 1:
            return
        context = eager_context.context()
        try:
            if self.is_chief:
                for index in range(1, self.num_workers):
                    context.get_config_key_value(f"{LEFT_KEY}/{index}", int(LEAVE_TIMEOUT_S * MS_PER_S))
            else:
                context.set_config_key_value(f"{LEFT_KEY}/{self.worker_index}", "1")
        except tf.errors.OpError as err:
            log.debug("leaving the cluster: %s", err)


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


def visible_gpus() -> int:
    """The GPUs this task sees (Slurm's --gpus-per-task and CUDA_VISIBLE_DEVICES already applied)."""
    gpus = tf.config.list_physical_devices("GPU")
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and listed.strip() and len(listed.split(",")) != len(gpus):
        log.warning("CUDA_VISIBLE_DEVICES=%s lists %d device(s) but TensorFlow sees %d GPU(s): using %d",
                    listed, len(listed.split(",")), len(gpus), len(gpus))
    return len(gpus)


def communication_options(gpus: int) -> tf.distribute.experimental.CommunicationOptions:
    """All-reduce over NCCL when the workers have GPUs, over gRPC rings between CPUs otherwise."""
    implementation = tf.distribute.experimental.CommunicationImplementation
    return tf.distribute.experimental.CommunicationOptions(
        implementation=implementation.NCCL if gpus else implementation.RING
    )


def slurm_resolver(task: SlurmTask, gpus: int) -> tf.distribute.cluster_resolver.ClusterResolver:
    """A resolver for the cluster in Slurm's task order (job/slurm.py), with this task's GPUs."""
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": task.workers}), task_type="worker", task_id=task.task_id,
        num_accelerators={"GPU": gpus} if gpus else None, rpc_layer="grpc",
    )


def make_cluster(runtime: RuntimeConfig | None = None) -> Cluster:
    """Build the strategy this process should train under (runtime: the Slurm ports and barrier timeout)."""
    runtime = runtime or RuntimeConfig()
    cluster = _make_cluster(runtime.slurm_port_base, runtime.slurm_port_count)
    cluster.barrier_timeout_s = runtime.barrier_timeout_s
    return cluster


def _make_cluster(port_base: int, port_count: int) -> Cluster:
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
    gpus = visible_gpus()
    if "TF_CONFIG" not in os.environ and (translated := vertex_tf_config()):
        os.environ["TF_CONFIG"] = translated
    if "TF_CONFIG" in os.environ:
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        return _multi_worker(resolver, gpus, "multi-worker (TF_CONFIG)")
    if _slurm_multi_task():
        task = slurm_task(os.environ, port_base, port_count)
        log.info("Slurm task %d: %s of %s", task.task_id, task.workers[task.task_id], ", ".join(task.workers))
        return _multi_worker(slurm_resolver(task, gpus), gpus, "multi-worker (Slurm)")
    if gpus > 1:
        return Cluster(tf.distribute.MirroredStrategy(), True, 0, 1, gpus, "mirrored")
    device = "/gpu:0" if gpus else "/cpu:0"
    return Cluster(tf.distribute.OneDeviceStrategy(device), True, 0, 1, gpus, "single")


def _multi_worker(resolver, gpus: int, kind: str) -> Cluster:
    options = communication_options(gpus)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver, communication_options=options)
    task_type, task_id = resolver.task_type, resolver.task_id or 0
    cluster_spec = resolver.cluster_spec().as_dict()
    num_workers = sum(len(v) for v in cluster_spec.values()) if cluster_spec else 1
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in cluster_spec)
    index = task_id + (1 if task_type == "worker" and "chief" in cluster_spec else 0)
    log.info("%s: task %s/%s, %d workers, chief=%s, %d GPU(s) per worker, all-reduce %s", kind, task_type, task_id,
             num_workers, is_chief, gpus, options.implementation.name)
    return Cluster(strategy, is_chief, index, num_workers, gpus, kind)
