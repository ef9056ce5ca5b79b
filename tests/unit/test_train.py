"""Tests for job.train on a two-layer model: the learning-rate schedule, BatchNorm debiasing, early stopping
and a resume whose patience is already spent (no MobileNetV2: each test runs in a second or two)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from job.distribute import Cluster
from job.train import (
    BEST_WEIGHTS,
    HISTORY_FILE,
    STOP_REQUESTED,
    LoopConfig,
    ParamGroup,
    Trainer,
    WarmupCosine,
    debias_batchnorm,
    debiased_batchnorm,
    make_optimizer,
)

PEAK, WARMUP, TOTAL = 0.8, 4, 12


# -- WarmupCosine and set_length -------------------------------------------------------------------
def test_warmup_cosine_rises_linearly_then_decays_to_zero():
    schedule = WarmupCosine(PEAK, WARMUP, TOTAL)
    lr = [float(schedule(step)) for step in range(TOTAL + 3)]
    np.testing.assert_allclose(lr[:WARMUP], [PEAK * (s + 1) / WARMUP for s in range(WARMUP)], rtol=1e-6)
    assert lr[WARMUP] == pytest.approx(PEAK)  # the peak, where the cosine starts
    assert lr[(WARMUP + TOTAL) // 2] == pytest.approx(PEAK / 2)  # half-way down the cosine
    assert lr[TOTAL] == pytest.approx(0.0, abs=1e-7) and lr[-1] == pytest.approx(0.0, abs=1e-7)  # stays at 0
    assert all(a >= b for a, b in zip(lr[WARMUP:], lr[WARMUP + 1 :]))
    no_warmup = WarmupCosine(PEAK, 0, TOTAL)
    assert float(no_warmup(0)) == pytest.approx(PEAK)


def test_set_length_moves_a_traced_schedule_without_retracing():
    """The downstream runs share one traced train step and call set_length for each run's length."""
    schedule = WarmupCosine(PEAK, WARMUP, TOTAL)
    traces = []

    @tf.function
    def rate(step):
        traces.append(step)
        return schedule(step)

    middle = (WARMUP + TOTAL) // 2
    assert float(rate(tf.constant(middle))) == pytest.approx(PEAK / 2)
    schedule.set_length(0, middle)  # no warmup, and the decay now ends where it was half-way
    assert float(rate(tf.constant(0))) == pytest.approx(PEAK)
    assert float(rate(tf.constant(middle // 2))) == pytest.approx(PEAK / 2)
    assert float(rate(tf.constant(middle))) == pytest.approx(0.0, abs=1e-7)
    assert len(traces) == 1
    assert schedule.get_config() == {"peak": pytest.approx(PEAK), "warmup_steps": 0, "total_steps": middle}


def test_an_optimizer_steps_by_its_schedule():
    schedule = WarmupCosine(PEAK, 2, 10)
    optimizer = make_optimizer("sgd", schedule, weight_decay=0.0)
    variable = tf.Variable(0.0)
    optimizer.build([variable])
    moved = []
    for _ in range(3):
        before = float(variable.numpy())
        optimizer.apply_gradients([(tf.constant(1.0), variable)])
        moved.append(before - float(variable.numpy()))
    # Nesterov momentum 0.9: the first step moves by lr * (1 + 0.9) * gradient, at the warmup's first rate.
    assert moved[0] == pytest.approx(PEAK / 2 * 1.9, rel=1e-5)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_is_decoupled_one_lr_times_decay_a_step(name: str):
    """A zero gradient still shrinks the weights by lr * weight_decay a step, outside the momentum.

    Why cpu-real and t4 set 5e-3 where RotNet's PyTorch recipe says 5e-4: there the decay is added to the
    gradient, and momentum 0.9 carries it into ~1 / (1 - 0.9) = 10 steps' updates.
    """
    lr, decay, steps = 0.1, 5e-3, 20
    optimizer = make_optimizer(name, WarmupCosine(lr, 0, 10**9), weight_decay=decay)
    variable = tf.Variable(2.0)
    optimizer.build([variable])
    for _ in range(steps):
        optimizer.apply_gradients([(tf.constant(0.0), variable)])
    assert float(variable.numpy()) == pytest.approx(2.0 * (1 - lr * decay) ** steps, rel=1e-5)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_exempt_variables_keep_their_weights_while_the_others_decay(name: str):
    """pretext/finetune.weight_decay_exempt: the optimizer skips the decay of the variables it is given."""
    lr, decay = 0.1, 0.5
    decayed, exempt = tf.Variable(2.0), tf.Variable(2.0)
    optimizer = make_optimizer(name, WarmupCosine(lr, 0, 10**9), weight_decay=decay, exempt=[exempt])
    optimizer.build([decayed, exempt])
    optimizer.apply_gradients([(tf.constant(0.0), decayed), (tf.constant(0.0), exempt)])
    assert float(decayed.numpy()) == pytest.approx(2.0 * (1 - lr * decay), rel=1e-5)
    assert float(exempt.numpy()) == 2.0


# -- BatchNorm debiasing ---------------------------------------------------------------------------
MOMENTUM = 0.9
UPDATES = 5


def _batchnorm_model() -> tuple[keras.Model, keras.layers.BatchNormalization, keras.layers.BatchNormalization]:
    fresh = keras.layers.BatchNormalization(momentum=MOMENTUM, name="fresh")
    frozen = keras.layers.BatchNormalization(momentum=MOMENTUM, name="frozen")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, [fresh(inputs), frozen(inputs)])
    frozen.trainable = False  # e.g. finetune.freeze_batchnorm: its statistics are not this run's
    return model, fresh, frozen


def _batch() -> np.ndarray:
    return np.random.default_rng(0).normal([3.0, -2.0, 0.5], [0.1, 0.2, 0.05], (16, 3)).astype(np.float32)


def _statistics(layer) -> tuple[np.ndarray, np.ndarray]:
    return np.array(layer.moving_mean), np.array(layer.moving_variance)


def test_debias_batchnorm_recovers_the_batch_statistics():
    """After t updates from Keras' (0, 1) start, the corrected statistics are the average of the batches seen."""
    model, fresh, frozen = _batchnorm_model()
    x = _batch()
    for _ in range(UPDATES):
        model(x, training=True)
    mean, variance = _statistics(fresh)
    residue = MOMENTUM**UPDATES
    np.testing.assert_allclose(mean, (1 - residue) * x.mean(0), rtol=1e-5)  # still far from the data
    saved = debias_batchnorm(model, UPDATES)
    mean, variance = _statistics(fresh)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(variance, x.var(0), rtol=1e-3)
    frozen_mean, frozen_variance = _statistics(frozen)
    np.testing.assert_array_equal(frozen_mean, 0.0)  # a frozen layer keeps its statistics
    np.testing.assert_array_equal(frozen_variance, 1.0)
    assert len(saved) == 1


@pytest.mark.parametrize("updates", [0, 1000])
def test_debias_batchnorm_leaves_statistics_without_residue_alone(updates):
    """No update yet (nothing to correct by) or so many that the start no longer weighs: unchanged."""
    model, fresh, _ = _batchnorm_model()
    model(_batch(), training=True)
    mean, variance = _statistics(fresh)
    assert debias_batchnorm(model, updates) == []
    np.testing.assert_array_equal(_statistics(fresh)[0], mean)
    np.testing.assert_array_equal(_statistics(fresh)[1], variance)


def test_debiased_batchnorm_restores_the_statistics_afterwards():
    """Evaluation sees corrected statistics; training continues from the raw ones, even after an error."""
    model, fresh, _ = _batchnorm_model()
    x = _batch()
    for _ in range(UPDATES):
        model(x, training=True)
    mean, variance = _statistics(fresh)
    with pytest.raises(RuntimeError), debiased_batchnorm(model, UPDATES):
        np.testing.assert_allclose(_statistics(fresh)[0], x.mean(0), rtol=1e-5)
        raise RuntimeError("an evaluation failed")
    np.testing.assert_array_equal(_statistics(fresh)[0], mean)
    np.testing.assert_array_equal(_statistics(fresh)[1], variance)


# -- early stopping and resume ---------------------------------------------------------------------
STEPS_PER_EPOCH, BATCH = 2, 4
PATIENCE = 2
# Monitored value per epoch: improves, improves, worse, equal to the best (not an improvement) → stop after
# epoch 4; the epochs after it would have improved.
SCORES = [0.5, 0.6, 0.4, 0.6, 0.9, 0.95, 0.97, 0.99]
STOP_EPOCHS, BEST_EPOCH, BN_MOMENTUM = 4, 1, 0.5


def _cluster() -> Cluster:
    return Cluster(tf.distribute.OneDeviceStrategy("/cpu:0"), True, 0, 1, False, "single")


def _loop(epochs: int = len(SCORES), eval_every_epochs: int = 1, patience: int = PATIENCE) -> LoopConfig:
    return LoopConfig(epochs=epochs, steps_per_epoch=STEPS_PER_EPOCH, samples_per_step=BATCH,
                      checkpoint_every_steps=100, keep_checkpoints=2, log_every_steps=100, patience=patience,
                      monitor="val_accuracy", eval_every_epochs=eval_every_epochs)


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((2,)), keras.layers.BatchNormalization(momentum=BN_MOMENTUM),
                             keras.layers.Dense(2)])


BATCH_X = np.array([[3.0, 1.0], [2.0, -1.0], [4.0, 0.5], [3.0, -0.5]], np.float32)


class Recorder:
    """A dataset factory and an evaluator (scripted by SCORES) that record how the loop used them."""

    def __init__(self, model: keras.Model, scores: list[float] = SCORES):
        self.model, self.datasets, self.evaluated, self.weights, self.bn_means = model, [], [], [], []
        self.scores = scores

    def dataset_fn(self, epochs: range, start_step: int, context) -> tf.data.Dataset:
        self.datasets.append((epochs, start_step))
        batch = {"x": BATCH_X, "y": np.array([0, 1, 0, 1], np.int32)}
        return tf.data.Dataset.from_tensors(batch).repeat(len(epochs) * STEPS_PER_EPOCH - start_step)

    def evaluator(self, epoch: int, writer) -> dict[str, float]:
        self.evaluated.append(epoch)
        self.weights.append([np.array(w) for w in self.model.get_weights()])
        self.bn_means.append(np.array(self.model.layers[0].moving_mean))
        return {"val_accuracy": self.scores[epoch]}


def _trainer(directory: Path, loop: LoopConfig) -> tuple[Trainer, keras.Model]:
    """A Trainer of a fresh `_model()`, built under the cluster's strategy as the stages build theirs."""
    cluster = _cluster()
    with cluster.strategy.scope():
        model = _model()
        optimizer = make_optimizer("adamw", WarmupCosine(0.1, 0, 100), weight_decay=0.0)

    def objective(batch, training):
        logits = model(batch["x"], training=training)
        loss = keras.losses.sparse_categorical_crossentropy(batch["y"], logits, from_logits=True)
        return loss, {"loss": (tf.reduce_sum(loss), tf.cast(tf.size(loss), tf.float32))}

    trainer = Trainer(cluster, model, objective, [ParamGroup(model.trainable_variables, optimizer)], directory,
                      directory / "logs", loop)
    return trainer, model


@pytest.fixture(scope="module")
def early_stopped(tmp_path_factory):
    """A run that stopped early: its directory, model, Recorder and result (the tests only read them)."""
    STOP_REQUESTED.clear()
    directory = tmp_path_factory.mktemp("early_stopped") / "stage"
    trainer, model = _trainer(directory, _loop())
    recorder = Recorder(model)
    result = trainer.fit(recorder.dataset_fn, recorder.evaluator)
    trainer.close()
    return directory, model, recorder, result


def test_early_stopping_stops_after_patience_epochs_without_improvement(early_stopped):
    directory, model, recorder, result = early_stopped
    assert recorder.evaluated == list(range(STOP_EPOCHS))
    assert result.stopped_early and result.epochs == STOP_EPOCHS
    assert result.steps == STOP_EPOCHS * STEPS_PER_EPOCH
    assert result.best == pytest.approx(SCORES[BEST_EPOCH])
    history = json.loads((directory / HISTORY_FILE).read_text())
    assert [h["epoch"] for h in history] == list(range(1, STOP_EPOCHS + 1))
    # The best epoch's weights, as the evaluator saw them (with debiased BatchNorm statistics).
    best = _model()
    best.load_weights(directory / BEST_WEIGHTS)
    for saved, seen in zip(best.get_weights(), recorder.weights[BEST_EPOCH], strict=True):
        np.testing.assert_array_equal(saved, seen)


def test_evaluation_sees_debiased_statistics_and_training_keeps_the_raw_ones(early_stopped):
    """Every epoch's evaluation saw the batch mean (the (0, 1) start removed); the model keeps the raw average."""
    _, model, recorder, result = early_stopped
    for seen in recorder.bn_means:
        np.testing.assert_allclose(seen, BATCH_X.mean(0), rtol=1e-5)
    raw = (1 - BN_MOMENTUM**result.steps) * BATCH_X.mean(0)
    np.testing.assert_allclose(np.array(model.layers[0].moving_mean), raw, rtol=1e-5)


def test_a_resume_whose_patience_is_spent_trains_no_more(early_stopped):
    """Restarted with the same command after an early stop: it restores, and neither trains nor evaluates."""
    directory, model, _, first = early_stopped
    trainer, resumed_model = _trainer(directory, _loop())
    recorder = Recorder(resumed_model)
    result = trainer.fit(recorder.dataset_fn, recorder.evaluator)
    trainer.close()
    assert recorder.datasets == [] and recorder.evaluated == []
    assert result.stopped_early
    assert (result.steps, result.epochs, result.best) == (first.steps, first.epochs, first.best)
    assert [h["epoch"] for h in result.history] == list(range(1, STOP_EPOCHS + 1))
    for restored, trained in zip(resumed_model.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(restored, trained)


def test_best_record_is_the_epoch_whose_weights_finalize_loads(early_stopped):
    """The pretrain stage reports that record's validation instead of evaluating the finalized model again (the
    whole val set in four rotations: ~10 s on the real subset). Epoch 4 equals the best value: not the one saved."""
    directory, *_ = early_stopped
    trainer, _ = _trainer(directory, _loop())
    trainer.restore()
    record = trainer.best_record()
    trainer.close()
    assert record is not None
    assert (record["epoch"], record["val_accuracy"]) == (BEST_EPOCH + 1, SCORES[BEST_EPOCH])


# -- evaluating every few epochs -------------------------------------------------------------------
EVERY = 3


@pytest.mark.parametrize("patience", [0, 4])
def test_evaluating_every_few_epochs_evaluates_those_and_the_last(tmp_path, patience):
    """Every third epoch and the last (8, not a multiple of 3) are evaluated, the others only trained: their
    records hold the train metrics alone, and the best weights come from an evaluated epoch. No stop: with a
    patience of 4 epochs, the worse value after epoch 6 is 3 epochs without improvement."""
    STOP_REQUESTED.clear()
    scores = [0.0, 0.0, 0.6, 0.0, 0.0, 0.5, 0.0, 0.7]
    trainer, model = _trainer(tmp_path / "stage", _loop(len(scores), EVERY, patience))
    recorder = Recorder(model, scores)
    result = trainer.fit(recorder.dataset_fn, recorder.evaluator)
    trainer.close()
    assert recorder.evaluated == [2, 5, 7]
    assert (result.epochs, result.steps, result.stopped_early) == (8, 8 * STEPS_PER_EPOCH, False)
    assert [h["epoch"] for h in result.history if "val_accuracy" in h] == [3, 6, 8]
    assert all("train_loss" in h for h in result.history)
    assert result.best == pytest.approx(0.7)
    best = _model()
    best.load_weights(tmp_path / "stage" / BEST_WEIGHTS)
    for saved, seen in zip(best.get_weights(), recorder.weights[-1], strict=True):
        np.testing.assert_array_equal(saved, seen)


def test_early_stopping_counts_epochs_between_evaluations(tmp_path):
    """A patience of 2 epochs, evaluations every 3: one evaluation without improvement is 3 epochs, so training
    stops after epoch 6 (counting evaluations, it would have gone on to epoch 8)."""
    STOP_REQUESTED.clear()
    scores = [0.0, 0.0, 0.6, 0.0, 0.0, 0.5, 0.0, 0.7]
    trainer, model = _trainer(tmp_path / "stage", _loop(len(scores), EVERY, patience=2))
    recorder = Recorder(model, scores)
    result = trainer.fit(recorder.dataset_fn, recorder.evaluator)
    trainer.close()
    assert recorder.evaluated == [2, 5]
    assert (result.epochs, result.stopped_early, result.best) == (6, True, pytest.approx(0.6))


# -- closing -----------------------------------------------------------------------------------------
class _Teardown:
    """Stands in for a fit's iterator: records the thread that frees it."""

    freed_on: list[str] = []

    def __del__(self):
        _Teardown.freed_on.append(threading.current_thread().name)


def test_close_frees_the_fits_iterator_off_the_main_thread(tmp_path):
    """A distributed iterator's teardown waits for tf.data's autotuning thread (up to ~20 s between downstream runs,
    seen by py-spy as the main thread idle right after train_downstream returned): close() leaves it to a thread."""
    trainer, _ = _trainer(tmp_path / "stage", _loop())
    trainer._iterator = _Teardown()
    trainer.close()
    for thread in threading.enumerate():
        if thread.name == "release-iterator":
            thread.join(timeout=10)
    assert trainer._iterator is None
    assert _Teardown.freed_on == ["release-iterator"]


_EXIT_RIGHT_AFTER_CLOSE = """
import sys, time
from pathlib import Path
from job.train import Trainer

class SlowTeardown:
    def __del__(self):
        time.sleep(1.0)
        Path(sys.argv[1]).write_text("freed")

trainer = Trainer.__new__(Trainer)  # only the iterator matters here
trainer._iterator = SlowTeardown()
trainer._release_iterator()
"""


def test_the_process_waits_for_the_iterators_teardown_before_it_exits(tmp_path):
    """A run ending right after a downstream fit: the teardown thread finishes before the interpreter does (a daemon
    thread was cut off mid-teardown, and inside TensorFlow's C++ that aborted the process with exit -6)."""
    marker = tmp_path / "freed"
    done = subprocess.run([sys.executable, "-c", _EXIT_RIGHT_AFTER_CLOSE, str(marker)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert marker.read_text() == "freed"
