"""What a training resumes from, kept together: the global step, the optimizers, the early-stopping state,
the epochs' history and the best weights, checkpointed as one unit (job/units.py) every so many steps."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import keras
import tensorflow as tf

from job import units
from job.distribute import Cluster
from job.files import atomic_path, read_json, write_json
from job.optim import ParamGroup

HISTORY_FILE = "history.json"
BEST_WEIGHTS = "best.weights.h5"
CHECKPOINT_DIR = "ckpt"
STEP_KEY = "step/.ATTRIBUTES/VARIABLE_VALUE"  # the global step in a checkpoint (tf.train.Checkpoint(step=...))


class EarlyStopping:
    """The best value of the monitored metric and the epochs since it improved, as checkpointed variables
    (a resumed run keeps counting); on each improvement `save_best` keeps the weights."""

    def __init__(self, patience: int, save_best):
        self.patience, self.save_best = patience, save_best
        self.best = tf.Variable(-math.inf, dtype=tf.float64, trainable=False, name="best_metric")
        self.bad_epochs = tf.Variable(0, dtype=tf.int64, trainable=False, name="bad_epochs")

    @property
    def spent(self) -> bool:
        """Whether the patience has run out (then training stops, or a resumed run does not start)."""
        return self.patience > 0 and int(self.bad_epochs.numpy()) >= self.patience

    def update(self, value: float | None, epochs: int = 1) -> bool:
        """Record the monitored value measured after `epochs` more epochs (None: not measured); True when
        training should stop."""
        if value is None:
            return False
        if value > float(self.best.numpy()):
            self.best.assign(value)
            self.bad_epochs.assign(0)
            self.save_best()
        else:
            self.bad_epochs.assign_add(epochs)
        return self.spent


class TrainState:
    """The checkpointed state of one training in `directory`: step, model, optimizers and early stopping, with
    the history and best weights as the checkpoint's companions. Built under the cluster's strategy."""

    def __init__(self, cluster: Cluster, model: keras.Model, groups: list[ParamGroup], directory: Path,
                 keep_checkpoints: int, patience: int):
        self.cluster, self.model, self.directory = cluster, model, Path(directory)
        with cluster.strategy.scope():
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
            self.early_stopping = EarlyStopping(patience, self._keep_best_weights)
            for group in groups:
                if not group.optimizer.built:
                    group.optimizer.build(group.variables)
        trackables = {f"optimizer{i}": g.optimizer for i, g in enumerate(groups)}
        self.checkpoint = tf.train.Checkpoint(
            model=model, step=self.step, best=self.early_stopping.best, bad_epochs=self.early_stopping.bad_epochs,
            **trackables,
        )
        self.ckpt_dir = cluster.writable_dir(self.directory / CHECKPOINT_DIR)
        # Non-chief workers keep their best weights beside their private checkpoints: the chief writes the shared
        # file while they would read it (and HDF5 locks it).
        self.best_path = (self.directory if cluster.is_chief else self.ckpt_dir) / BEST_WEIGHTS
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, str(self.ckpt_dir), max_to_keep=keep_checkpoints, checkpoint_name=units.CHECKPOINT_NAME,
        )
        self.history: list[dict[str, float]] = []  # the completed epochs', saved with each checkpoint
        self._restored: units.Companions | None = None
        self.restored_from: str | None = None  # the checkpoint restore() resumed from
        self._best_weights: list | None = None  # the best epoch's weights since the last checkpoint, unwritten

    @property
    def global_step(self) -> int:
        return int(self.step.numpy())

    def checkpointed_step(self) -> int:
        """The global step of the latest checkpoint (0 without one): where training resumes."""
        latest = self.manager.latest_checkpoint
        return int(tf.train.load_checkpoint(latest).get_tensor(STEP_KEY)) if latest else 0

    def restore(self, steps_per_epoch: int) -> int:
        """Restore the latest checkpoint, its history and best weights, if there is one; returns the step."""
        latest = self.manager.latest_checkpoint or tf.train.latest_checkpoint(str(self.directory / CHECKPOINT_DIR))
        if latest:
            self.checkpoint.restore(latest).expect_partial()
            self.restored_from = latest
            # Resume with the restored checkpoint's own history and best weights, not whatever is beside it.
            self._restored = units.companions(Path(latest))
            if self._restored is not None:
                units.adopt_best_weights(self._restored, self.best_path)
        self.history = self.load_history(self.global_step // steps_per_epoch)
        return self.global_step

    def load_history(self, completed_epochs: int) -> list[dict[str, float]]:
        """The history of the first `completed_epochs` epochs: the restored checkpoint's, else history.json's."""
        if self._restored is not None:
            return [h for h in self._restored.history if h["epoch"] <= completed_epochs]
        path = self.directory / HISTORY_FILE
        if not path.is_file():
            return []
        fix = "delete it to resume without the earlier epochs' history, or rerun with --force"
        return [h for h in read_json(path, fix) if h["epoch"] <= completed_epochs]

    def end_epoch(self, record: dict[str, float], checkpoint: bool) -> None:
        """Append an epoch's record to the history, write history.json (chief) and, if asked, checkpoint the step
        (a resumed run repeats the epochs since the last checkpoint, their records included)."""
        self.history.append(record)
        if self.cluster.is_chief:
            write_json(self.directory / HISTORY_FILE, self.history)
        if checkpoint:
            self.save()

    def save(self) -> None:
        """Checkpoint the current step as one unit (job/units.py): its companions first, so that the index naming
        it finds them, then TF's files and index; companions of the checkpoints the manager drops go with them."""
        step = self.global_step
        prefix = self.ckpt_dir / f"{units.CHECKPOINT_NAME}-{step}"
        self._write_best_weights()
        if self.cluster.is_chief:
            units.stamp(prefix, self.history, self.best_path)
        self.manager.save(checkpoint_number=step)
        if self.cluster.is_chief:
            units.sweep(self.ckpt_dir, self.manager.checkpoints)

    def _keep_best_weights(self) -> None:
        """Hold the weights of a new best epoch in memory; `save` writes them (Keras' save_weights took ~0.25 s,
        half a downstream epoch, and a downstream run improves most epochs)."""
        self._best_weights = self.model.get_weights()

    def _write_best_weights(self) -> None:
        """Write the best epoch's weights held since the last checkpoint to best_path, leaving the model as it was."""
        if self._best_weights is None:
            return
        current = self.model.get_weights()
        self.model.set_weights(self._best_weights)
        try:
            with atomic_path(self.best_path) as tmp:  # a stop signal mid-write leaves the previous best
                self.model.save_weights(tmp)
        finally:
            self.model.set_weights(current)
        self._best_weights = None

    def close(self) -> None:
        """Remove a non-chief worker's private checkpoints."""
        if self.ckpt_dir != self.directory / CHECKPOINT_DIR:
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
