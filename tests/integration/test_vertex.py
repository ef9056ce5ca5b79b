"""Vertex AI: the custom-job specs in infra/vertex/ and the job under Vertex's multi-worker environment.

The specs are parsed strictly into google.cloud.aiplatform_v1 CustomJobSpec (an unknown or misspelt field
fails, as the API would refuse it). The slow test runs two local workers with a Vertex-style CLUSTER_SPEC
(workerpool0 = chief, workerpool1 = worker), as Vertex AI starts the replicas of infra/vertex/multiworker.yaml.
"""

from __future__ import annotations

import copy
import json
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from google.cloud.aiplatform_v1.types import AcceleratorType, CustomJobSpec
from google.protobuf.json_format import ParseError

from job.cli import main
from job.layout import RunLayout
from job.synth import make_synthetic_dataset
from tests.jobproc import REPO, job_args, job_env

VERTEX = REPO / "infra" / "vertex"
SPECS = ("t4.yaml", "multiworker.yaml")


def _load(name: str) -> dict:
    return yaml.safe_load((VERTEX / name).read_text())


def _parse(document: dict) -> CustomJobSpec:
    return CustomJobSpec.from_json(json.dumps(document), ignore_unknown_fields=False)


@pytest.mark.parametrize("name", SPECS)
def test_spec_parses_strictly_as_a_custom_job_spec(name):
    spec = _parse(_load(name))
    assert spec.worker_pool_specs
    for pool in spec.worker_pool_specs:
        assert pool.machine_spec.machine_type == "n1-standard-8"
        assert pool.machine_spec.accelerator_type == AcceleratorType.NVIDIA_TESLA_T4
        assert pool.machine_spec.accelerator_count == 1
        assert pool.replica_count >= 1
        assert pool.container_spec.image_uri.endswith("/rotnet-job:latest")
        assert not pool.container_spec.command  # the image's ENTRYPOINT: python -m job


@pytest.mark.parametrize("name", SPECS)
def test_args_are_a_job_command_writing_to_the_base_output_directory(name):
    spec = _parse(_load(name))
    base = spec.base_output_directory.output_uri_prefix
    assert base.startswith("gs://")
    for pool in spec.worker_pool_specs:
        args = list(pool.container_spec.args)
        assert args[args.index("--output") + 1] == base  # so AIP_MODEL_DIR etc. are <output>/model/ ...
        assert args[args.index("--data") + 1].startswith("gs://")
        command = main.get_command(None, args[0])
        assert command is not None, f"{args[0]} is not a job command"
        command.make_context(args[0], args[1:])  # every option exists and parses (nothing runs)


def test_multiworker_spec_has_one_chief_and_identical_workers():
    spec = _parse(_load("multiworker.yaml"))
    chief, *others = spec.worker_pool_specs
    assert chief.replica_count == 1
    assert len(others) == 1 and others[0].replica_count >= 1
    assert list(others[0].container_spec.args) == list(chief.container_spec.args)
    assert others[0].container_spec.image_uri == chief.container_spec.image_uri
    assert spec.scheduling.restart_job_on_worker_restart


@pytest.mark.parametrize(
    "path, field",
    [
        ((), "workerPoolSpec"),  # singular: a typo of workerPoolSpecs
        (("workerPoolSpecs", 0, "machineSpec"), "gpuCount"),
        (("workerPoolSpecs", 0, "containerSpec"), "image"),
        (("baseOutputDirectory",), "uri"),
    ],
)
def test_an_unknown_field_is_refused(path, field):
    document = copy.deepcopy(_load("t4.yaml"))
    node = document
    for key in path:
        node = node[key]
    node[field] = 1
    with pytest.raises(ParseError):
        _parse(document)


def test_a_wrong_enum_value_is_refused():
    document = _load("t4.yaml")
    document["workerPoolSpecs"][0]["machineSpec"]["acceleratorType"] = "TESLA_T4"
    with pytest.raises(ParseError):
        _parse(document)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.mark.slow
def test_two_workers_with_a_vertex_cluster_spec(tmp_path):
    data = tmp_path / "data.zip"
    make_synthetic_dataset(data, classes=4, per_class=16, downstream_per_class=24, val_per_class=4, image_size=32)
    output, cache = tmp_path / "run", tmp_path / "cache"
    chief_port, worker_port = _free_ports(2)
    cluster = {"workerpool0": [f"127.0.0.1:{chief_port}"], "workerpool1": [f"127.0.0.1:{worker_port}"]}
    job = {"workerPoolSpecs": _load("multiworker.yaml")["workerPoolSpecs"]}
    base = {k: v for k, v in job_env().items() if k not in ("TF_CONFIG", "CLUSTER_SPEC") and not k.startswith("SLURM_")}
    processes = {}
    for pool in ("workerpool0", "workerpool1"):
        spec = {"cluster": cluster, "task": {"type": pool, "index": 0, "trial": ""}, "job": job}
        env = dict(base, CLUSTER_SPEC=json.dumps(spec))
        processes[pool] = subprocess.Popen(
            job_args("pretrain", data, output, cache, "pretext.epochs=1"), cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    logs = {}
    try:
        for pool, process in processes.items():
            out, err = process.communicate(timeout=540)
            logs[pool] = err
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    for pool, process in processes.items():
        assert process.returncode == 0, f"{pool} exited {process.returncode}:\n{logs.get(pool, '')[-4000:]}"
    chief, worker = logs["workerpool0"], logs["workerpool1"]
    assert "multi-worker (TF_CONFIG): task chief/0, 2 workers, chief=True" in chief, chief[-4000:]
    assert "multi-worker (TF_CONFIG): task worker/0, 2 workers, chief=False" in worker, worker[-4000:]
    pretrain_line = next(line for line in chief.splitlines() if "pretrain: " in line)
    assert "2 replicas" in pretrain_line, pretrain_line
    layout = RunLayout(output)
    assert layout.backbone.is_file() and layout.rotation_model.is_file()
    assert RunLayout.done(layout.pretext).is_file()
    assert len(list((output / "logs").rglob("events.out.tfevents.*"))) == 1  # the chief's alone
    assert not [p for p in Path(output).rglob("*") if "worker" in p.name]
