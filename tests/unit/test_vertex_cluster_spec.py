"""Tests for job.distribute.vertex_tf_config: Vertex AI's CLUSTER_SPEC as the TF_CONFIG TensorFlow reads.

Vertex AI names its replica pools workerpool0 (the primary replica), workerpool1 (workers), workerpool2
(reduction servers or parameter servers) and workerpool3; MultiWorkerMirroredStrategy wants a chief and
workers. The TF_CONFIG made here is read back with TensorFlow's own resolver, as job.distribute.make_cluster
does (no strategy is built).
"""

from __future__ import annotations

import json

import pytest
import tensorflow as tf

from job.distribute import vertex_tf_config

CHIEF = ["cmle-training-workerpool0-0a1b2c3d-0:2222"]
WORKERS = ["cmle-training-workerpool1-0a1b2c3d-0:2222", "cmle-training-workerpool1-0a1b2c3d-1:2222"]
REDUCTION_SERVERS = ["cmle-training-workerpool2-0a1b2c3d-0:2222"]


def _cluster_spec(task_type: str, index: int, pools: dict[str, list[str]]) -> str:
    """CLUSTER_SPEC as Vertex AI sets it in each replica (with the fields TensorFlow does not read)."""
    return json.dumps({"cluster": pools, "environment": "cloud",
                       "task": {"type": task_type, "index": index, "trial": ""},
                       "job": {"workerPoolSpecs": [{"replicaCount": len(p)} for p in pools.values()]}})


@pytest.fixture(autouse=True)
def _no_cluster_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CLUSTER_SPEC", "TF_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def _resolved(monkeypatch: pytest.MonkeyPatch, tf_config: str) -> tuple[str, int, dict]:
    monkeypatch.setenv("TF_CONFIG", tf_config)
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    return resolver.task_type, resolver.task_id, resolver.cluster_spec().as_dict()


@pytest.mark.parametrize(
    ("task_type", "index", "expected_task"),
    [("workerpool0", 0, ("chief", 0)), ("workerpool1", 0, ("worker", 0)), ("workerpool1", 1, ("worker", 1))],
)
def test_primary_replica_is_the_chief_and_workerpool1_the_workers(monkeypatch, task_type, index, expected_task):
    pools = {"workerpool0": CHIEF, "workerpool1": WORKERS, "workerpool2": REDUCTION_SERVERS}
    monkeypatch.setenv("CLUSTER_SPEC", _cluster_spec(task_type, index, pools))
    tf_config = vertex_tf_config()
    assert json.loads(tf_config) == {"cluster": {"chief": CHIEF, "worker": WORKERS},
                                     "task": {"type": expected_task[0], "index": expected_task[1]}}
    # Reduction servers are not TensorFlow tasks: a strategy waiting for them would never start.
    assert _resolved(monkeypatch, tf_config) == (*expected_task, {"chief": CHIEF, "worker": WORKERS})


def test_a_single_replica_job_is_a_chief_alone(monkeypatch):
    monkeypatch.setenv("CLUSTER_SPEC", _cluster_spec("workerpool0", 0, {"workerpool0": CHIEF}))
    tf_config = vertex_tf_config()
    assert json.loads(tf_config) == {"cluster": {"chief": CHIEF}, "task": {"type": "chief", "index": 0}}
    assert _resolved(monkeypatch, tf_config) == ("chief", 0, {"chief": CHIEF})


def test_without_cluster_spec_there_is_nothing_to_translate():
    assert vertex_tf_config() is None
