"""Vertex AI: the job specs in infra/vertex/ and the job under Vertex's multi-worker environment.

The specs are parsed strictly (json_format.ParseDict, ignore_unknown_fields=False) into google.cloud.aiplatform_v1
types: CustomJobSpec for the custom jobs, HyperparameterTuningJob for the tuning job (an unknown or misspelt
field fails, as the API would refuse it). Their args are parsed by the job's own command line, as each replica
and each tuning trial runs them. The slow test runs two local workers with a Vertex-style CLUSTER_SPEC
(workerpool0 = chief, workerpool1 = worker), as Vertex AI starts the replicas of infra/vertex/multiworker.yaml.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from google.cloud.aiplatform_v1.types import (
    AcceleratorType,
    CustomJobSpec,
    HyperparameterTuningJob,
    Scheduling,
    StudySpec,
)
from google.protobuf.json_format import ParseDict, ParseError

from job import hypertune
from job.cli import main, vertex_output
from job.config import load_config
from job.layout import RunLayout
from job.synth import make_synthetic_dataset
from tests.jobproc import REPO, free_ports, job_args, job_env

VERTEX = REPO / "infra" / "vertex"
SPECS = ("t4.yaml", "t4-spot.yaml", "multiworker.yaml")
TUNING = "hptune.yaml"
TENSORBOARD = re.compile(r"projects/[^/]+/locations/[^/]+/tensorboards/[^/]+")
SERVICE_ACCOUNT = re.compile(r"[a-z][a-z0-9-]+@[A-Za-z0-9-]+\.iam\.gserviceaccount\.com")


def _load(name: str) -> dict:
    return yaml.safe_load((VERTEX / name).read_text())


def _parse(document: dict) -> CustomJobSpec:
    return CustomJobSpec.wrap(ParseDict(document, CustomJobSpec.pb(CustomJobSpec()), ignore_unknown_fields=False))


def _parse_tuning(document: dict) -> HyperparameterTuningJob:
    message = HyperparameterTuningJob.pb(HyperparameterTuningJob())
    return HyperparameterTuningJob.wrap(ParseDict(document, message, ignore_unknown_fields=False))


def _job_specs() -> dict[str, CustomJobSpec]:
    """Every custom job spec: the custom jobs' and the tuning job's trial spec."""
    return {**{name: _parse(_load(name)) for name in SPECS}, TUNING: _parse_tuning(_load(TUNING)).trial_job_spec}


def _parsed_args(args: list[str]):
    """The click context `python -m job ARGS` gets (every option exists and parses; nothing runs)."""
    command = main.get_command(None, args[0])
    assert command is not None, f"{args[0]} is not a job command"
    return command.make_context(args[0], list(args[1:]))


@pytest.mark.parametrize("name", [*SPECS, TUNING])
def test_spec_parses_strictly(name):
    spec = _job_specs()[name]
    assert spec.worker_pool_specs
    for pool in spec.worker_pool_specs:
        assert pool.machine_spec.machine_type == "n1-standard-8"
        assert pool.machine_spec.accelerator_type == AcceleratorType.NVIDIA_TESLA_T4
        assert pool.machine_spec.accelerator_count == 1
        assert pool.replica_count >= 1
        assert pool.container_spec.image_uri.endswith("/rotnet-job:latest")
        assert not pool.container_spec.command  # the image's ENTRYPOINT: python -m job


@pytest.mark.parametrize("name", [*SPECS, TUNING])
def test_args_leave_the_output_to_the_base_output_directory(name):
    """No --output: the job takes AIP_MODEL_DIR's parent, which for a tuning trial is <base>/<trial id>."""
    spec = _job_specs()[name]
    base = spec.base_output_directory.output_uri_prefix
    assert base.startswith("gs://")
    for pool in spec.worker_pool_specs:
        args = list(pool.container_spec.args)
        assert "--output" not in args and not any(a.startswith("--output=") for a in args)
        assert args[args.index("--data") + 1].startswith("gs://")
        assert _parsed_args(args).params["output"] is None


@pytest.mark.parametrize("model_dir, expected", [
    ("gs://BUCKET/runs/rotnet-t4/model/", "gs://BUCKET/runs/rotnet-t4"),  # a custom job
    ("gs://BUCKET/runs/rotnet-hptune/7/model/", "gs://BUCKET/runs/rotnet-hptune/7"),  # trial 7 of a tuning job
])
def test_the_output_is_the_parent_of_aip_model_dir(monkeypatch, model_dir, expected):
    base = model_dir.rstrip("/").rsplit("/", 1)[0]
    monkeypatch.setenv("AIP_MODEL_DIR", model_dir)
    monkeypatch.setenv("AIP_CHECKPOINT_DIR", f"{base}/checkpoints/")
    monkeypatch.setenv("AIP_TENSORBOARD_LOG_DIR", f"{base}/logs/")
    assert vertex_output() == expected


def test_multiworker_spec_has_one_chief_and_identical_workers():
    spec = _parse(_load("multiworker.yaml"))
    chief, *others = spec.worker_pool_specs
    assert chief.replica_count == 1
    assert len(others) == 1 and others[0].replica_count >= 1
    assert list(others[0].container_spec.args) == list(chief.container_spec.args)
    assert others[0].container_spec.image_uri == chief.container_spec.image_uri
    assert spec.scheduling.restart_job_on_worker_restart


def test_spot_spec_is_the_t4_job_on_spot_vms():
    spot, t4 = _parse(_load("t4-spot.yaml")), _parse(_load("t4.yaml"))
    assert spot.scheduling.strategy == Scheduling.Strategy.SPOT
    assert t4.scheduling.strategy == Scheduling.Strategy.STRATEGY_UNSPECIFIED  # on-demand
    assert list(spot.worker_pool_specs) == list(t4.worker_pool_specs)
    assert spot.base_output_directory.output_uri_prefix != t4.base_output_directory.output_uri_prefix


def test_tuning_spec_searches_config_keys_and_optimises_a_reported_metric():
    job = _parse_tuning(_load(TUNING))
    assert 0 < job.parallel_trial_count <= job.max_trial_count
    study = job.study_spec
    assert [m.metric_id for m in study.metrics] == ["downstream.val_accuracy"]
    assert all(m.metric_id in hypertune.REPORTED_METRICS for m in study.metrics)
    assert study.metrics[0].goal == StudySpec.MetricSpec.GoalType.MAXIMIZE
    ids = [p.parameter_id for p in study.parameters]
    assert ids == ["pretext.learning_rate", "pretext.epochs"]
    (pool,) = job.trial_job_spec.worker_pool_specs
    args = list(pool.container_spec.args)
    for parameter in study.parameters:
        bounds = parameter.double_value_spec or parameter.integer_value_spec
        for value in (bounds.min_value, bounds.max_value):
            # A trial's command as Vertex AI builds it: the spec's args, then --PARAMETER_ID=VALUE.
            ctx = _parsed_args([*args, f"--{parameter.parameter_id}={value}"])
            overrides = [*ctx.params["overrides"], *hypertune.overrides_from_args(ctx.args)]
            config = load_config(ctx.params["config_name"], overrides)  # in range, the right type
            section, key = parameter.parameter_id.split(".")
            assert getattr(getattr(config, section), key) == value


def test_tuning_trials_name_a_vertex_tensorboard_and_a_service_account():
    trial = _parse_tuning(_load(TUNING)).trial_job_spec
    assert TENSORBOARD.fullmatch(trial.tensorboard), trial.tensorboard
    assert SERVICE_ACCOUNT.fullmatch(trial.service_account), trial.service_account


def test_the_optional_tensorboard_and_service_account_documented_in_t4_yaml_parse():
    """t4.yaml's comment shows the two optional lines; with them the spec still parses strictly."""
    text = (VERTEX / "t4.yaml").read_text()
    optional = [line.removeprefix("#").strip() for line in text.splitlines()
                if re.match(r"#\s+(tensorboard|serviceAccount): ", line)]
    assert len(optional) == 2, optional
    spec = _parse({**_load("t4.yaml"), **yaml.safe_load("\n".join(optional))})
    assert TENSORBOARD.fullmatch(spec.tensorboard) and SERVICE_ACCOUNT.fullmatch(spec.service_account)


@pytest.mark.parametrize(
    "path, field",
    [
        ((), "workerPoolSpec"),  # singular: a typo of workerPoolSpecs
        (("workerPoolSpecs", 0, "machineSpec"), "gpuCount"),
        (("workerPoolSpecs", 0, "containerSpec"), "image"),
        (("baseOutputDirectory",), "uri"),
        (("scheduling",), "spot"),
    ],
)
def test_an_unknown_field_is_refused(path, field):
    document = copy.deepcopy(_load("t4-spot.yaml"))
    node = document
    for key in path:
        node = node[key]
    node[field] = 1
    with pytest.raises(ParseError):
        _parse(document)


@pytest.mark.parametrize("path, field", [
    ((), "trialSpec"),
    (("studySpec",), "metric"),
    (("studySpec", "parameters", 0), "doubleSpec"),
    (("trialJobSpec",), "tensorBoard"),
])
def test_an_unknown_tuning_field_is_refused(path, field):
    document = copy.deepcopy(_load(TUNING))
    node = document
    for key in path:
        node = node[key]
    node[field] = 1
    with pytest.raises(ParseError):
        _parse_tuning(document)


@pytest.mark.parametrize("name, path, value", [
    ("t4.yaml", ("workerPoolSpecs", 0, "machineSpec", "acceleratorType"), "TESLA_T4"),
    ("t4-spot.yaml", ("scheduling", "strategy"), "PREEMPTIBLE"),
    (TUNING, ("studySpec", "metrics", 0, "goal"), "MAX"),
])
def test_a_wrong_enum_value_is_refused(name, path, value):
    document = copy.deepcopy(_load(name))
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ParseError):
        (_parse_tuning if name == TUNING else _parse)(document)


@pytest.mark.slow
def test_two_workers_with_a_vertex_cluster_spec(tmp_path):
    data = tmp_path / "data.zip"
    make_synthetic_dataset(data, classes=4, per_class=16, downstream_per_class=24, val_per_class=4, image_size=32)
    output, cache = tmp_path / "run", tmp_path / "cache"
    chief_port, worker_port = free_ports(2)
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
