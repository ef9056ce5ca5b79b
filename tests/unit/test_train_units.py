"""The trainer saves each checkpoint with its companions and resumes from them (job/units.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from job.distribute import Cluster
from job.train import BEST_WEIGHTS, HISTORY_FILE, LoopConfig, ParamGroup, Trainer

STEPS, BATCH = 2, 4
VAL_ACCURACY = [0.5, 0.7, 0.6]  # epochs 1 and 2 improve; epoch 3 does not


def _trainer(directory: Path, epochs: int) -> Trainer:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    cluster = Cluster(tf.distribute.get_strategy(), True, 0, 1, False, "single")

    def objective(batch, training):
        per_example = tf.reduce_mean(tf.square(model(batch["x"], training=training) - 1.0), axis=-1)
        return per_example, {"loss": (tf.reduce_sum(per_example), tf.cast(tf.size(per_example), tf.float32))}

    config = LoopConfig(epochs=epochs, steps_per_epoch=STEPS, samples_per_step=BATCH, checkpoint_every_steps=100,
                        keep_checkpoints=2, log_every_steps=100, fresh_batchnorm=False)
    groups = [ParamGroup(model.trainable_variables, keras.optimizers.SGD(0.1))]
    return Trainer(cluster, model, objective, groups, directory, directory / "logs", config)


def _data(epochs, start, _ctx):  # every epoch of the fit in one dataset, as the trainer asks
    x = np.concatenate([np.random.default_rng(e).normal(size=(STEPS * BATCH, 3)) for e in epochs])
    return tf.data.Dataset.from_tensor_slices({"x": x.astype(np.float32)}).batch(BATCH).skip(start)


def _evaluator(epoch, _writer):
    return {"val_accuracy": VAL_ACCURACY[epoch]}


@pytest.mark.filterwarnings("ignore")
def test_resume_takes_history_and_best_weights_from_the_restored_checkpoint(tmp_path: Path) -> None:
    """The bucket named epoch 2's checkpoint beside epoch 1's history.json and best weights (their uploads
    lost the race, or failed). Before: the resumed run had one epoch of history (wrong `epochs` and
    `train_seconds`) and finalize exported epoch 1's weights as best (or crashed on a torn file)."""
    first = _trainer(tmp_path, epochs=1)
    first.fit(_data, _evaluator)
    epoch1_history = (tmp_path / HISTORY_FILE).read_bytes()
    epoch1_best = (tmp_path / BEST_WEIGHTS).read_bytes()
    first.close()
    second = _trainer(tmp_path, epochs=2)
    second.fit(_data, _evaluator)
    second.close()
    ckpt = tmp_path / "ckpt"
    assert json.loads((ckpt / "ckpt-4.history.json").read_text())[-1]["epoch"] == 2
    assert (ckpt / "ckpt-4.best.weights.h5").read_bytes() == (tmp_path / BEST_WEIGHTS).read_bytes()
    epoch2_best = (tmp_path / BEST_WEIGHTS).read_bytes()
    assert epoch2_best != epoch1_best

    mirror = tmp_path / "resumed"
    shutil.copytree(tmp_path, mirror, ignore=shutil.ignore_patterns("resumed"))
    (mirror / HISTORY_FILE).write_bytes(epoch1_history)
    (mirror / BEST_WEIGHTS).write_bytes(epoch1_best[: len(epoch1_best) // 2])  # older, and torn
    resumed = _trainer(mirror, epochs=3)
    result = resumed.fit(_data, _evaluator)
    resumed.finalize(use_best=True)
    assert [h["epoch"] for h in result.history] == [1, 2, 3] and result.epochs == 3
    assert (mirror / BEST_WEIGHTS).read_bytes() == epoch2_best  # epoch 3 did not improve: epoch 2's stays
    assert sorted(p.name for p in (mirror / "ckpt").iterdir() if p.name.endswith(".history.json")) == [
        "ckpt-4.history.json", "ckpt-6.history.json"]  # the dropped checkpoint's companions went with it
    resumed.close()


@pytest.mark.filterwarnings("ignore")
def test_the_best_epochs_weights_wait_for_the_next_checkpoint_and_the_model_keeps_its_own(tmp_path: Path) -> None:
    """One checkpoint here, at the fit's end (checkpoint_every_steps 100 > 6 steps): it writes best.weights.h5 with
    epoch 2's weights (the best), while the model keeps epoch 3's until finalize. Before, each improvement wrote
    the file (Keras' save_weights: ~0.25 s, half a downstream epoch) and each epoch end checkpointed."""
    trainer = _trainer(tmp_path, epochs=3)
    seen = {}

    def evaluator(epoch, writer):
        seen[epoch] = trainer.model.get_weights()
        return _evaluator(epoch, writer)

    trainer.fit(_data, evaluator)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("ckpt-*.index")) == ["ckpt-6.index"]
    best = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    best.load_weights(tmp_path / BEST_WEIGHTS)
    assert not np.array_equal(seen[1][0], seen[2][0])  # epochs 2 and 3 differ
    for kept, epoch2 in zip(best.get_weights(), seen[1], strict=True):
        np.testing.assert_array_equal(kept, epoch2)
    for current, epoch3 in zip(trainer.model.get_weights(), seen[2], strict=True):
        np.testing.assert_array_equal(current, epoch3)
    trainer.finalize(use_best=True)
    for final, epoch2 in zip(trainer.model.get_weights(), seen[1], strict=True):
        np.testing.assert_array_equal(final, epoch2)
    trainer.close()


def test_early_stopping_alone_counts_epochs_without_improvement_and_keeps_the_best():
    """job.trainstate.EarlyStopping without a trainer: the best value, the patience, a save per improvement."""
    from job.trainstate import EarlyStopping

    saved = []
    stopping = EarlyStopping(patience=2, save_best=lambda: saved.append(float(stopping.best.numpy())))
    assert not stopping.update(None) and not stopping.spent  # an epoch without the metric changes nothing
    assert [stopping.update(v) for v in (0.5, 0.7, 0.6, 0.7)] == [False, False, False, True]
    assert saved == [0.5, 0.7] and float(stopping.best.numpy()) == 0.7 and stopping.spent
    unlimited = EarlyStopping(patience=0, save_best=lambda: None)
    assert not any(unlimited.update(v) for v in (0.5, 0.4, 0.3, 0.2)) and not unlimited.spent
