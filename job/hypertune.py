"""Vertex AI hyperparameter tuning: a trial's hyperparameters in, its metrics out.

Vertex AI passes each trial's values as `--PARAMETER_ID=VALUE` arguments; this job's parameter ids are config
keys (`--pretext.learning_rate=0.05`), read as `--set` overrides. The metrics go out as the `cloudml-hypertune`
package writes them (its whole protocol, without the dependency): JSON lines in the file named by
$CLOUD_ML_HP_METRIC_FILE (default /tmp/hypertune/output.metrics), one per metric, the metric's tag (its
metrics.json key, e.g. `downstream.val_accuracy`) holding the value as a string. Only a tuning trial writes it.
No TensorFlow here.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from job.errors import JobError
from job.files import atomic_path

log = logging.getLogger(__name__)

METRIC_FILE_ENV = "CLOUD_ML_HP_METRIC_FILE"
DEFAULT_METRIC_FILE = "/tmp/hypertune/output.metrics"
METRIC_TAG_ENV = "CLOUD_ML_HP_METRIC_TAG"  # the study's metric, where the service names it
TRIAL_ID_ENV = "CLOUD_ML_TRIAL_ID"
CLUSTER_SPEC_ENV = "CLUSTER_SPEC"  # Vertex AI's: task.trial is the trial's id (empty outside tuning)
DEFAULT_TRIAL_ID = "0"  # what cloudml-hypertune records when no trial id is set
# The metrics.json keys reported to a study (a spec's metricId names one of them), where they are not null.
REPORTED_METRICS = (
    "downstream.val_accuracy",
    "downstream.linear_probe_val_accuracy",
    "downstream.knn_val_accuracy",
    "pretext.val_rotation_accuracy",
    "pretext.linear_probe_200_top1",
)
# `--section.key=value` or `--section.key value`: a hyperparameter as Vertex AI passes it.
HYPERPARAMETER = re.compile(r"--([A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*)(?:=(.*))?", re.DOTALL)


def overrides_from_args(args: Sequence[str]) -> list[str]:
    """Extra command-line arguments `--section.key=value` (or `--section.key value`) as `section.key=value`
    overrides; anything else is a JobError naming it."""
    overrides, rest = [], list(args)
    while rest:
        arg = rest.pop(0)
        match = HYPERPARAMETER.fullmatch(arg)
        if match is None:
            raise JobError(f"no such option or argument {arg!r}: see --help (a config value is passed as "
                           "--set SECTION.KEY=VALUE, or --SECTION.KEY=VALUE as Vertex AI passes hyperparameters).")
        key, value = match.group(1), match.group(2)
        if value is None:
            if not rest:
                raise JobError(f"{arg} has no value: pass it as {arg}=VALUE.")
            value = rest.pop(0)
        overrides.append(f"{key}={value}")
    return overrides


def trial_id(env: Mapping[str, str]) -> str | None:
    """The tuning trial this process runs, or None outside hyperparameter tuning."""
    if env.get(TRIAL_ID_ENV):
        return env[TRIAL_ID_ENV]
    try:
        spec = json.loads(env.get(CLUSTER_SPEC_ENV) or "{}")
    except json.JSONDecodeError:
        return None
    task = spec.get("task") if isinstance(spec, dict) else None
    trial = task.get("trial") if isinstance(task, dict) else None
    return str(trial) if trial not in (None, "") else None


def is_trial(env: Mapping[str, str]) -> bool:
    """Whether a tuning service expects this process's metrics."""
    return trial_id(env) is not None or bool(env.get(METRIC_TAG_ENV)) or bool(env.get(METRIC_FILE_ENV))


def metric_lines(metrics: Mapping[str, Any], trial: str, now: float) -> list[str]:
    """One cloudml-hypertune JSON line per reported metric that metrics.json holds (not null)."""
    lines = []
    for key in REPORTED_METRICS:
        value = _lookup(metrics, key)
        if value is None:
            continue
        record = {"timestamp": now, "trial": trial, key: str(float(value)), "global_step": "0"}
        lines.append(json.dumps(record, sort_keys=True))
    return lines


def report(metrics: Mapping[str, Any], env: Mapping[str, str]) -> Path | None:
    """Write the run's metrics for the tuning service when this is a trial; return the file (None otherwise)."""
    if not is_trial(env):
        return None
    trial = trial_id(env) or DEFAULT_TRIAL_ID
    lines = metric_lines(metrics, trial, time.time())
    tag = env.get(METRIC_TAG_ENV)
    reported = [json_key for line in lines for json_key in json.loads(line) if json_key in REPORTED_METRICS]
    if tag and tag not in reported:
        log.warning("%s=%s is not a metric this run reports: a study's metricId must be one of %s", METRIC_TAG_ENV,
                    tag, ", ".join(reported))
    path = Path(env.get(METRIC_FILE_ENV) or DEFAULT_METRIC_FILE)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in lines))
    log.info("Hyperparameter tuning trial %s: reported %s to %s", trial, ", ".join(reported), path)
    return path


def _lookup(metrics: Mapping[str, Any], dotted: str) -> Any:
    node: Any = metrics
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node
