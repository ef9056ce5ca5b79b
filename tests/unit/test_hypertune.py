"""job.hypertune: a Vertex AI tuning trial's hyperparameters (extra `--SECTION.KEY=VALUE` arguments) and its
metrics file in cloudml-hypertune's format; the CLI reads the one and writes the other. No TensorFlow here."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from job import hypertune
from job.cli import main
from job.config import load_config
from job.errors import JobError

METRICS = {
    "pretext": {"val_rotation_accuracy": 0.5, "linear_probe_200_top1": None},
    "downstream": {"val_accuracy": 0.9375, "linear_probe_val_accuracy": 0.875, "knn_val_accuracy": 0.75},
}


def test_hyperparameter_arguments_become_overrides():
    args = ["--pretext.learning_rate=0.05", "--pretext.epochs", "12", "--finetune.seeds=1"]
    overrides = hypertune.overrides_from_args(args)
    assert overrides == ["pretext.learning_rate=0.05", "pretext.epochs=12", "finetune.seeds=1"]
    config = load_config("t4", overrides)
    assert (config.pretext.learning_rate, config.pretext.epochs, config.finetune.seeds) == (0.05, 12, 1)


@pytest.mark.parametrize("args, fragment", [
    (["--forse"], "'--forse'"),
    (["extra"], "'extra'"),
    (["--pretext.epochs"], "has no value"),
])
def test_other_extra_arguments_are_errors(args, fragment):
    with pytest.raises(JobError, match="no such option|has no value") as caught:
        hypertune.overrides_from_args(args)
    assert fragment in str(caught.value)


def test_stage_command_accepts_trial_arguments_and_refuses_typos():
    run = main.get_command(None, "run")
    ctx = run.make_context("run", ["--data", "d.zip", "--pretext.learning_rate=0.05", "--pretext.epochs", "3"])
    assert hypertune.overrides_from_args(ctx.args) == ["pretext.learning_rate=0.05", "pretext.epochs=3"]


@pytest.mark.parametrize("env, trial", [
    ({}, None),
    ({"CLUSTER_SPEC": json.dumps({"task": {"type": "workerpool0", "index": 0, "trial": ""}})}, None),
    ({"CLUSTER_SPEC": json.dumps({"task": {"type": "workerpool0", "index": 0, "trial": "7"}})}, "7"),
    ({"CLOUD_ML_TRIAL_ID": "3"}, "3"),
    ({"CLUSTER_SPEC": "not json"}, None),
])
def test_trial_id_from_the_environment(env, trial):
    assert hypertune.trial_id(env) == trial


def test_outside_tuning_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(hypertune, "DEFAULT_METRIC_FILE", str(tmp_path / "hypertune" / "output.metrics"))
    assert hypertune.report(METRICS, {}) is None
    assert not (tmp_path / "hypertune").exists()


def test_a_trial_writes_one_hypertune_line_per_metric(tmp_path):
    path = tmp_path / "hypertune" / "output.metrics"
    spec = json.dumps({"task": {"type": "workerpool0", "index": 0, "trial": "12"}})
    assert hypertune.report(METRICS, {"CLOUD_ML_HP_METRIC_FILE": str(path), "CLUSTER_SPEC": spec}) == path
    records = [json.loads(line) for line in path.read_text().splitlines()]
    # What cloudml-hypertune's report_hyperparameter_tuning_metric(tag, value) writes: sorted keys, the value and
    # the trial as strings, a timestamp and a global step.
    assert [sorted(r) for r in records] == [sorted(["global_step", "timestamp", "trial", tag]) for tag in (
        "downstream.val_accuracy", "downstream.linear_probe_val_accuracy", "downstream.knn_val_accuracy",
        "pretext.val_rotation_accuracy")]  # the null 200-way probe is left out
    assert records[0]["downstream.val_accuracy"] == "0.9375" and records[3]["pretext.val_rotation_accuracy"] == "0.5"
    assert {r["trial"] for r in records} == {"12"} and {r["global_step"] for r in records} == {"0"}
    assert all(isinstance(r["timestamp"], float) for r in records)
    assert path.read_text().splitlines()[0] == json.dumps(records[0], sort_keys=True)
    assert [p.name for p in path.parent.iterdir()] == ["output.metrics"]  # no temporary file left


def test_the_default_metric_file_and_a_tag_the_run_does_not_report(tmp_path, monkeypatch, caplog):
    default = tmp_path / "tmp" / "hypertune" / "output.metrics"
    monkeypatch.setattr(hypertune, "DEFAULT_METRIC_FILE", str(default))
    with caplog.at_level(logging.WARNING, logger="job.hypertune"):
        assert hypertune.report(METRICS, {"CLOUD_ML_HP_METRIC_TAG": "accuracy"}) == default
    assert json.loads(default.read_text().splitlines()[0])["trial"] == hypertune.DEFAULT_TRIAL_ID
    assert "CLOUD_ML_HP_METRIC_TAG=accuracy is not a metric this run reports" in caplog.text


def test_every_reported_metric_is_a_metrics_json_key():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for key in hypertune.REPORTED_METRICS:
        assert f"`{key}`" in readme, f"{key} is not documented in README.md's metrics.json table"
