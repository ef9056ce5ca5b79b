"""Tests for job.summaries: event files cut back on resume.

Event files are read as TensorBoard reads them (its Python loader, `plugin_event_accumulator`) or record by
record (`summary_iterator`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

from job import summaries
from tests.tbevents import events


def accumulator(directory: Path) -> EventAccumulator:
    loaded = EventAccumulator(str(directory))
    loaded.Reload()
    return loaded


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

    write_steps(logs, range(5, 10))  # the resumed process
    logged = events(logs)
    assert len(logged) == len(set(logged))
    assert [s for t, s in logged if t == "train/loss"] == list(range(1, 10))
    assert [e.step for e in accumulator(logs).Tensors("train/loss")] == list(range(1, 10))
