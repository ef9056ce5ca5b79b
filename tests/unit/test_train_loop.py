"""Several train steps per traced call (`runtime.steps_per_loop`): the same training as one step per call, with
checkpoints, logs, epoch ends and stops on their steps, and one trace for every loop length."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from job.distribute import Cluster
from job.train import HISTORY_FILE, STOP_REQUESTED, LoopConfig, ParamGroup, Preempted, Trainer, loop_length

STEPS_PER_EPOCH, EPOCHS, BATCH, FEATURES = 11, 2, 4, 3
CHECKPOINT_EVERY, LOG_EVERY, STEPS_PER_LOOP = 5, 100, 4
# Each call's length with 4 steps per loop: up to the next checkpoint step (5, 10, 15, 20) or epoch end (11, 22).
CALLS = [4, 1, 4, 1, 1, 4, 4, 1, 2]
CHECKPOINT_STEPS = [5, 10, 15, 20, 22]  # not 11, the first epoch end


@pytest.mark.parametrize(("step", "expected"), [
    (0, 4),  # a whole loop
    (4, 1),  # stops on the checkpoint step 5
    (10, 1),  # stops on the epoch end 11
    (19, 1),  # stops on the log step 20
    (20, 2),  # stops on the epoch end 22
])
def test_loop_length_ends_on_the_next_boundary(step, expected):
    assert loop_length(step, STEPS_PER_LOOP, epoch_end=22 if step >= 11 else 11, periods=(5, 20)) == expected


def _epoch(epoch: int) -> tf.data.Dataset:
    rng = np.random.default_rng(epoch)
    x = rng.normal(size=(STEPS_PER_EPOCH * BATCH, FEATURES)).astype(np.float32)
    y = rng.integers(0, 2, STEPS_PER_EPOCH * BATCH).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices({"x": x, "y": y}).batch(BATCH)


def _data(epochs: range, start: int, _context) -> tf.data.Dataset:
    """The batches of `epochs`, one after the other, the first from its step `start` (a Trainer's DatasetFn)."""
    dataset = _epoch(epochs.start).skip(start)
    for epoch in epochs[1:]:
        dataset = dataset.concatenate(_epoch(epoch))
    return dataset


def _evaluator(epoch: int, _writer) -> dict[str, float]:
    return {"val_accuracy": float(epoch)}


class Parts:
    """A two-layer model with its objective and SGD group, on one CPU (what a Trainer trains)."""

    def __init__(self):
        self.cluster = Cluster(tf.distribute.OneDeviceStrategy("/cpu:0"), True, 0, 1, False, "single")
        with self.cluster.strategy.scope():
            keras.utils.set_random_seed(0)
            self.model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(8, activation="relu"),
                                           keras.layers.Dense(2)])
            self.groups = [ParamGroup(self.model.trainable_variables, keras.optimizers.SGD(0.1, momentum=0.9))]

    def objective(self, batch, training):
        logits = self.model(batch["x"], training=training)
        loss = keras.losses.sparse_categorical_crossentropy(batch["y"], logits, from_logits=True)
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), batch["y"]), tf.float32)
        count = tf.cast(tf.size(loss), tf.float32)
        return loss, {"loss": (tf.reduce_sum(loss), count), "accuracy": (tf.reduce_sum(correct), count)}

    def trainer(self, directory: Path, steps_per_loop: int, step_fn=None) -> Trainer:
        config = LoopConfig(epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH, samples_per_step=BATCH,
                            checkpoint_every_steps=CHECKPOINT_EVERY, keep_checkpoints=len(CHECKPOINT_STEPS),
                            log_every_steps=LOG_EVERY, steps_per_loop=steps_per_loop, fresh_batchnorm=False)
        return Trainer(self.cluster, self.model, self.objective, self.groups, directory, directory / "logs", config,
                       step_fn=step_fn)


def _fit(directory: Path, steps_per_loop: int) -> tuple[Parts, Trainer, list[int]]:
    """Train to the end; returns the parts, the trainer and each call's number of steps."""
    STOP_REQUESTED.clear()
    parts = Parts()
    trainer = parts.trainer(directory, steps_per_loop)
    calls = []
    run_steps = trainer.run_steps

    def counted(iterator, steps):
        calls.append(steps)
        return run_steps(iterator, steps)

    trainer.run_steps = counted
    trainer.fit(_data, _evaluator)
    trainer.close()
    return parts, trainer, calls


def _checkpoint_steps(directory: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1].split(".")[0]) for p in (directory / "ckpt").glob("ckpt-*.index"))


@pytest.mark.filterwarnings("ignore")
def test_several_steps_per_call_train_as_one_step_per_call(tmp_path: Path) -> None:
    """Before runtime.steps_per_loop: each step was one call and one host read (22 calls here)."""
    single, _, single_calls = _fit(tmp_path / "single", 1)
    looped, trainer, looped_calls = _fit(tmp_path / "looped", STEPS_PER_LOOP)
    assert single_calls == [1] * EPOCHS * STEPS_PER_EPOCH
    assert looped_calls == CALLS
    assert trainer.step_fn.experimental_get_tracing_count() == 1  # one trace for lengths 1, 2 and 4
    assert int(trainer.step.numpy()) == EPOCHS * STEPS_PER_EPOCH  # counted in-graph, one per step
    for expected, actual in zip(single.model.get_weights(), looped.model.get_weights(), strict=True):
        np.testing.assert_array_equal(actual, expected)
    single_history = json.loads((tmp_path / "single" / HISTORY_FILE).read_text())
    looped_history = json.loads((tmp_path / "looped" / HISTORY_FILE).read_text())
    for one, many in zip(single_history, looped_history, strict=True):
        assert {k: v for k, v in one.items() if k != "epoch_seconds"} == pytest.approx(
            {k: v for k, v in many.items() if k != "epoch_seconds"}, rel=1e-12)
    # A checkpoint at every multiple of checkpoint_every_steps and at the fit's end, none elsewhere.
    assert _checkpoint_steps(tmp_path / "looped") == CHECKPOINT_STEPS == _checkpoint_steps(tmp_path / "single")


@pytest.mark.filterwarnings("ignore")
def test_a_stop_is_taken_at_the_loop_boundary_and_a_shared_loop_counts_each_trainer_steps(tmp_path: Path) -> None:
    """A stop requested before training: the first call's 4 steps run, then a checkpoint and Preempted at step 4.
    A second trainer reusing the traced loop (as the downstream runs do) counts its own steps, without tracing."""
    STOP_REQUESTED.clear()
    parts = Parts()
    first = parts.trainer(tmp_path / "first", STEPS_PER_LOOP)
    STOP_REQUESTED.set()
    try:
        with pytest.raises(Preempted) as stopped:
            first.fit(_data, _evaluator)
    finally:
        STOP_REQUESTED.clear()
    assert stopped.value.step == STEPS_PER_LOOP
    assert _checkpoint_steps(tmp_path / "first") == [STEPS_PER_LOOP]
    second = parts.trainer(tmp_path / "second", STEPS_PER_LOOP, step_fn=first.step_fn)
    second.fit(_data, _evaluator)
    second.close()
    assert int(second.step.numpy()) == EPOCHS * STEPS_PER_EPOCH
    assert int(first.step.numpy()) == STEPS_PER_LOOP
    assert first.step_fn.experimental_get_tracing_count() == 1


@pytest.mark.filterwarnings("ignore")
def test_a_stop_at_the_fits_end_evaluates_the_epoch_and_checkpoints_once(tmp_path: Path) -> None:
    """A stop requested in the call that ends the last epoch (step 22), where the fit checkpoints anyway: the epoch
    is evaluated and recorded, and the checkpoint at step 22 is written once, not once for the fit's end and again
    for the stop."""
    STOP_REQUESTED.clear()
    trainer = Parts().trainer(tmp_path / "stage", STEPS_PER_LOOP)
    run_steps, save, saved = trainer.run_steps, trainer.state.save, []

    def stop_at_the_fits_end(iterator, steps):
        if trainer.state.global_step + steps == EPOCHS * STEPS_PER_EPOCH:
            STOP_REQUESTED.set()
        return run_steps(iterator, steps)

    def counted_save():
        saved.append(trainer.state.global_step)
        save()

    trainer.run_steps, trainer.state.save = stop_at_the_fits_end, counted_save
    try:
        with pytest.raises(Preempted) as stopped:
            trainer.fit(_data, _evaluator)
    finally:
        STOP_REQUESTED.clear()
    assert stopped.value.step == EPOCHS * STEPS_PER_EPOCH
    assert saved == CHECKPOINT_STEPS
    assert [h["epoch"] for h in trainer.state.history] == [1, 2]
    assert "val_accuracy" in trainer.state.history[-1]


@pytest.mark.filterwarnings("ignore")
def test_a_fit_reads_one_dataset_and_a_resumed_fit_the_rest_of_it(tmp_path: Path) -> None:
    """One dataset (one iterator) for all of a fit's epochs: no iterator is torn down at an epoch's end. Stopped at
    step 4 and resumed, the fit asks for the epochs left from that step and ends where an uninterrupted one does."""
    STOP_REQUESTED.clear()
    whole, _, _ = _fit(tmp_path / "whole", STEPS_PER_LOOP)
    parts = Parts()
    asked = []

    def data(epochs: range, start: int, context) -> tf.data.Dataset:
        asked.append((epochs, start))
        return _data(epochs, start, context)

    STOP_REQUESTED.set()
    try:
        with pytest.raises(Preempted):
            parts.trainer(tmp_path / "resumed", STEPS_PER_LOOP).fit(data, _evaluator)
    finally:
        STOP_REQUESTED.clear()
    resumed = Parts()
    trainer = resumed.trainer(tmp_path / "resumed", STEPS_PER_LOOP)
    trainer.fit(data, _evaluator)
    trainer.close()
    assert asked == [(range(0, EPOCHS), 0), (range(0, EPOCHS), STEPS_PER_LOOP)]
    for expected, actual in zip(whole.model.get_weights(), resumed.model.get_weights(), strict=True):
        np.testing.assert_array_equal(actual, expected)


def test_a_dataset_longer_than_the_fit_is_an_error(tmp_path: Path) -> None:
    STOP_REQUESTED.clear()
    trainer = Parts().trainer(tmp_path / "long", STEPS_PER_LOOP)
    with pytest.raises(RuntimeError, match="more than 11 batches an epoch"):
        trainer.fit(lambda epochs, start, context: _data(range(epochs.start, epochs.stop + 1), start, context),
                    _evaluator)
