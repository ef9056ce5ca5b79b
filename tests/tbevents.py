"""Read TensorBoard event files in tests: every summary value's (tag, step), in file order."""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from job.summaries import EVENTS_GLOB


def events(directory: Path) -> list[tuple[str, int]]:
    """(tag, step) of every summary value in every event file of `directory` (not below it), in file order."""
    found = []
    for path in sorted(Path(directory).glob(EVENTS_GLOB)):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            found += [(value.tag, event.step) for value in event.summary.value]
    return found


def steps(logged: list[tuple[str, int]], tag: str) -> list[int]:
    return [step for name, step in logged if name == tag]
