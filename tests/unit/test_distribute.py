"""The strategy's choices: all-reduce implementation by GPUs, the Slurm resolver in Slurm's task order."""

from __future__ import annotations

import tensorflow as tf

from job.distribute import communication_options, slurm_resolver
from job.slurm import SlurmTask

NCCL = tf.distribute.experimental.CommunicationImplementation.NCCL
RING = tf.distribute.experimental.CommunicationImplementation.RING


def test_nccl_with_gpus_ring_without():
    assert communication_options(0).implementation == RING
    assert communication_options(1).implementation == NCCL
    assert communication_options(4).implementation == NCCL


def test_slurm_resolver_keeps_slurm_order_and_this_tasks_gpus():
    workers = ["gpu9:20000", "gpu9:20001", "gpu10:20000"]
    resolver = slurm_resolver(SlurmTask(workers, task_id=2, host="gpu10", port=20000), gpus=4)
    assert resolver.cluster_spec().as_dict() == {"worker": workers}
    assert (resolver.task_type, resolver.task_id) == ("worker", 2)
    assert resolver.num_accelerators() == {"GPU": 4}
    assert slurm_resolver(SlurmTask(workers, 0, "gpu9", 20000), gpus=0).num_accelerators() == {}
