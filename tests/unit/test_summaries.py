"""Tests for job.summaries: the run's HParams session and text summaries, and event files cut back on resume.

Event files are read as TensorBoard reads them (its Python loader, `plugin_event_accumulator`) or record by
record (`summary_iterator`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from job import summaries
from job.config import load_config
from job.report import verdict_markdown
from tests.tbevents import events
from tests.unit.test_report import metrics  # noqa: F401 - the fixture

DATA = {"uri": "/data/tiny-imagenet-200.zip", "version": "size=123 mtime=456"}
DATASET = {"train_images": 100, "val_images": 20, "skipped_images": 0, "classes": 4}


def accumulator(directory: Path) -> EventAccumulator:
    loaded = EventAccumulator(str(directory))
    loaded.Reload()
    return loaded


# -- the run summary ---------------------------------------------------------------------------------
def test_run_summary_is_one_hparams_session_with_its_final_metrics(tmp_path, metrics):  # noqa: F811
    """Before: no hparams, no text; a run could not be compared with another in TensorBoard."""
    config = load_config("demo", ["pretext.epochs=3", "evaluate.label_fractions=[0.1, 1.0]"])
    directory = tmp_path / "logs" / "summary"
    for _ in range(2):  # rewritten, not appended to: one point per tag
        summaries.write_run_summary(directory, config, DATA, DATASET, metrics, verdict_markdown(metrics))
    assert len(list(directory.glob(summaries.EVENTS_GLOB))) == 1
    loaded = accumulator(directory)
    by_plugin = loaded.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    # A session, no experiment config: TensorBoard infers the table from every run's session (see job/summaries).
    assert set(by_plugin) == {hparams_metadata.SESSION_START_INFO_TAG}
    session = hparams_metadata.parse_session_start_info_plugin_data(by_plugin[hparams_metadata.SESSION_START_INFO_TAG])
    hparams = dict(session.hparams.items())
    assert hparams["pretext.epochs"].number_value == 3
    assert hparams["pretext.optimizer"].string_value == "adamw"
    assert hparams["evaluate.label_fractions"].string_value == "[0.1, 1.0]"
    assert hparams["--data"].string_value == DATA["uri"]
    assert "runtime.log_every_steps" not in hparams  # it shapes no result
    assert set(loaded.PluginTagToContent("scalars")) == {
        "final/rotation_accuracy", "final/linear_probe_200_top1", "final/linear_probe", "final/fish_duck_accuracy",
        *(f"final/labels_{f}/{k}" for f in ("0.1", "1") for k in ("pretrained", "scratch", "colour_histogram"))}

    def value(tag: str) -> float:
        (point,) = loaded.Tensors(tag)
        assert point.step == 0
        return float(tf.make_ndarray(point.tensor_proto))

    assert value("final/rotation_accuracy") == pytest.approx(0.6)
    assert value("final/linear_probe_200_top1") == pytest.approx(0.06)
    assert value("final/linear_probe") == pytest.approx(0.9)
    assert value("final/fish_duck_accuracy") == pytest.approx(0.95)
    assert value("final/labels_0.1/pretrained") == pytest.approx(0.85)
    assert value("final/labels_0.1/scratch") == pytest.approx(0.6)
    assert value("final/labels_1/colour_histogram") == pytest.approx(0.8)

    def text(tag: str) -> str:
        (point,) = loaded.Tensors(tag)
        return tf.make_ndarray(point.tensor_proto).item().decode()

    assert "| pretext.epochs | `3` |" in text("config") and "| runtime.log_every_steps | `10` |" in text("config")
    assert f"| --data | `{DATA['uri']}` |" in text("data") and "| train images | `100` |" in text("data")
    assert text("verdict").startswith("## Verdict") and "| 10% | 2 | 0.8500 ± 0.0500 |" in text("verdict")


def test_metrics_not_evaluated_have_a_column_but_no_value(metrics):  # noqa: F811
    metrics["pretext"]["linear_probe_200_top1"] = None
    found = {m.tag: m.value for m in summaries.final_metrics(metrics)}
    assert found["final/linear_probe_200_top1"] is None and found["final/rotation_accuracy"] == 0.6


# -- no step twice -----------------------------------------------------------------------------------
def write_steps(directory: Path, steps: range) -> None:
    writer = tf.summary.create_file_writer(str(directory))
    with writer.as_default():
        for step in steps:
            tf.summary.scalar("train/loss", 1.0 / step, step=step)
            if step % 3 == 0:
                tf.summary.image("val/rotations", np.zeros((1, 4, 4, 3), np.uint8), step=step)
    writer.close()


def test_a_resumed_training_drops_the_events_it_redoes(tmp_path):
    """Before: a run killed at step 7 after its checkpoint at step 4, then resumed, showed steps 5-7 twice."""
    logs = tmp_path / "logs"
    write_steps(logs, range(1, 8))  # the killed process logged up to step 7
    (killed,) = logs.glob(summaries.EVENTS_GLOB)
    with killed.open("ab") as stream:
        stream.write(b"\x10\x00\x00\x00")  # and died in the middle of a record
    assert summaries.drop_steps_after(logs, 4) == 4  # steps 5, 6 (scalar and image) and 7
    assert events(logs) == [("train/loss", 1), ("train/loss", 2), ("train/loss", 3), ("val/rotations", 3),
                            ("train/loss", 4)]
    unchanged = killed.read_bytes()
    assert summaries.drop_steps_after(logs, 4) == 0 and killed.read_bytes() == unchanged

    # The resumed process starts seconds later: its file sorts after the killed one's (names hold the second
    # and a per-process counter, which sorts "10" before "9" when both fall in one second in one process).
    time.sleep(1.01 - time.time() % 1)
    write_steps(logs, range(5, 10))  # the resumed process
    logged = events(logs)
    assert len(logged) == len(set(logged))
    assert [s for t, s in logged if t == "train/loss"] == list(range(1, 10))
    assert [e.step for e in accumulator(logs).Tensors("train/loss")] == list(range(1, 10))
