"""TensorBoard beyond the training loop's scalars, and event files that never show a step twice.

- `write_run_summary`: logs/summary, the run's HParams session (the settings that shape results as hparams,
  the final metrics of report/metrics.json as scalars) and three text summaries: the resolved config, the
  data's identity and the report's verdict. `tensorboard --logdir runs/` then compares runs in one table.
  No experiment config (`hp.hparams_config`) is written: TensorBoard would take one run's, arbitrarily, for
  all (its metric columns, no hparam types, nothing marked as differing); without one it infers the table
  from every session: each hparam's type and range over the runs, the differing ones first, and every
  run's final metrics (label fractions that other runs lack included).
- `drop_steps_after`: a resumed training's event files cut back to its checkpoint's step, so that the steps it
  redoes are not shown twice (by any reader: TensorBoard's data server, its Python loader, a bucket's copy).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import api as hp

from job.config import Config
from job.files import atomic_path
from job.rundir import EVALUATE, settings

log = logging.getLogger(__name__)

EVENTS_GLOB = "events.out.tfevents.*"
SUMMARY_STEP = 0  # the run summary is one point per tag
DATA_HPARAM = "--data"  # the data's URI beside the config keys (as job/rundir.py names it in its messages)
CONFIG_TAG, DATA_TAG, VERDICT_TAG = "config", "data", "verdict"
FINAL = "final"  # prefix of the final metrics' tags
# The final metrics of every run: (tag, metrics.json key, description).
FIXED_METRICS = (
    (f"{FINAL}/rotation_accuracy", "pretext.val_rotation_accuracy", "pretext val rotation accuracy (4-way)"),
    (f"{FINAL}/linear_probe_200_top1", "pretext.linear_probe_200_top1",
     "all-class linear probe on the frozen transferred features, val top-1"),
    (f"{FINAL}/linear_probe", "downstream.linear_probe_val_accuracy",
     "fish/duck linear probe on the frozen transferred features, val accuracy"),
    (f"{FINAL}/fish_duck_accuracy", "downstream.val_accuracy",
     "fish/duck val accuracy fine-tuned at finetune.label_fraction, mean over seeds"),
)
# Per label fraction (metrics.json label_efficiency): a row's key and its name.
PER_FRACTION = (("pretrained", "pretrained"), ("scratch", "scratch"), ("colour_histogram", "colour histogram"),
                ("s4l", "S4L from the pretrained backbone (evaluate.s4l)"))


@dataclass(frozen=True)
class FinalMetric:
    """One HParams metric: a scalar tag of logs/summary and its description; value None when not evaluated."""

    tag: str
    description: str
    value: float | None


# -- the run summary ---------------------------------------------------------------------------------
def run_hparams(config: Config, data_identity: Mapping[str, Any] | None) -> dict[str, bool | int | float | str]:
    """The resolved settings that shape results (the fingerprint's keys, job/rundir.py) and the data's URI, as
    HParams values (which are booleans, numbers or strings: lists become their JSON)."""
    values = {key: _hparam_value(value) for key, value in sorted(settings(config, EVALUATE).items())}
    values[DATA_HPARAM] = str((data_identity or {}).get("uri", "unknown"))
    return values


def _hparam_value(value: Any) -> bool | int | float | str:
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


def final_metrics(metrics: Mapping[str, Any]) -> list[FinalMetric]:
    """The report's final numbers as HParams metrics: rotation accuracy, the probes, the fine-tuned fish/duck
    accuracy, and per label fraction the pretrained, scratch, colour-histogram and S4L accuracy (means over seeds)."""
    found = [FinalMetric(tag, text, _lookup(metrics, key)) for tag, key, text in FIXED_METRICS]
    for row in metrics.get("label_efficiency") or []:
        fraction = row["fraction"]
        for key, name in PER_FRACTION:
            values = row.get(key) or []
            found.append(FinalMetric(f"{FINAL}/labels_{fraction:g}/{key}",
                                     f"fish/duck val accuracy, {name}, {100 * fraction:g}% of the labels",
                                     float(np.mean(values)) if values else None))
    return found


def _lookup(metrics: Mapping[str, Any], dotted: str) -> float | None:
    value: Any = metrics
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return None if value is None else float(value)


def config_markdown(config: Config) -> str:
    """Every resolved config key and its value, as a markdown table."""
    rows = [f"| {section}.{key} | `{json.dumps(value)}` |"
            for section, values in config.to_dict().items() for key, value in values.items()]
    return "\n".join(["| key | value |", "|---|---|", *rows])


def data_markdown(data_identity: Mapping[str, Any] | None, dataset: Mapping[str, Any]) -> str:
    """--data, its version (size and mtime, or the object's generation and checksums) and the images read."""
    identity = data_identity or {}
    rows = [("--data", identity.get("uri", "unknown")), ("version", identity.get("version", "unknown")),
            *((f"{key.replace('_', ' ')}", dataset.get(key)) for key in
              ("classes", "train_images", "val_images", "skipped_images"))]
    return "\n".join(["| | |", "|---|---|", *(f"| {name} | `{value}` |" for name, value in rows)])


def write_run_summary(directory: Path, config: Config, data_identity: Mapping[str, Any] | None,
                      dataset: Mapping[str, Any], metrics: Mapping[str, Any], verdict: str) -> None:
    """Replace `directory` (logs/summary) with the run's HParams session, its final metrics as scalars, and the
    config, data and verdict as text summaries."""
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)  # one session, one point per tag
    hparams = run_hparams(config, data_identity)
    final = final_metrics(metrics)
    writer = tf.summary.create_file_writer(str(directory))
    with writer.as_default(step=SUMMARY_STEP):
        hp.hparams(hparams)  # the session; its metrics are the scalars of this run (see the module's docstring)
        for metric in final:
            if metric.value is not None:
                tf.summary.scalar(metric.tag, metric.value, description=metric.description)
        tf.summary.text(CONFIG_TAG, config_markdown(config), description="the resolved configuration")
        tf.summary.text(DATA_TAG, data_markdown(data_identity, dataset), description="the data this run read")
        tf.summary.text(VERDICT_TAG, verdict, description="report/report.md's verdict")
    writer.close()
    log.info("TensorBoard: hparams, final metrics, config, data and verdict written to %s", directory)


# -- no step twice -----------------------------------------------------------------------------------
def drop_steps_after(directory: Path, step: int) -> int:
    """Rewrite the event files in `directory` without their events after `step`, which a training resumed
    from its checkpoint at `step` logs again; a torn last record (a kill mid-write) goes too. Files with
    nothing to drop are left untouched. Returns the number of events dropped."""
    dropped = 0
    for path in sorted(Path(directory).glob(EVENTS_GLOB)):
        kept, total, torn = _records_up_to(path, step)
        if len(kept) == total and not torn:
            continue
        with atomic_path(path) as tmp, tf.io.TFRecordWriter(str(tmp)) as writer:
            for record in kept:
                writer.write(record)
        dropped += total - len(kept)
        log.info("TensorBoard: dropped %d events after step %d (logged before a stop, redone on resume) from %s",
                 total - len(kept), step, path)
    return dropped


def _records_up_to(path: Path, step: int) -> tuple[list[bytes], int, bool]:
    """The serialized events of `path` at or before `step`, how many it holds, and whether its end is torn."""
    kept, total = [], 0
    try:
        for record in tf.data.TFRecordDataset(str(path)):
            raw = record.numpy()
            total += 1
            if event_pb2.Event.FromString(raw).step <= step:
                kept.append(raw)
    except tf.errors.DataLossError:
        return kept, total, True
    return kept, total, False
