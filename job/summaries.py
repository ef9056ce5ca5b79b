"""TensorBoard event files that never show a step twice.

- `drop_steps_after`: a resumed training's event files cut back to its checkpoint's step, so that the steps it
  redoes are not shown twice (by any reader: TensorBoard's data server, its Python loader, a bucket's copy).
"""

from __future__ import annotations

import logging
from pathlib import Path

import tensorflow as tf
from tensorboard.compat.proto import event_pb2

from job.files import atomic_path

log = logging.getLogger(__name__)

EVENTS_GLOB = "events.out.tfevents.*"


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
        log.info("TensorBoard: dropped %d events after step %d from %s (resumed at step %d)",
                 total - len(kept), step, path, step)
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
