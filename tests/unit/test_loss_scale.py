"""The training step's loss scaling with two parameter groups (the downstream backbone and head)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from job.distribute import Cluster
from job.train import LoopConfig, ParamGroup, Trainer, loss_scaled

BATCH, FEATURES, HIDDEN, CLASSES = 8, 6, 5, 3
STEPS = 3
# A gradient this large times the initial loss scale (2**15) overflows float32 (max ~3.4e38).
OVERFLOWING = 1e35


def _model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(HIDDEN, activation="relu", name="body")(inputs)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="head")(hidden))


def _groups(model: keras.Model) -> list[ParamGroup]:
    """Two groups with different optimizers and learning rates, as the downstream backbone and head."""
    return [
        ParamGroup(model.get_layer("head").trainable_variables, keras.optimizers.SGD(0.1, momentum=0.9)),
        ParamGroup(model.get_layer("body").trainable_variables, keras.optimizers.AdamW(0.01, weight_decay=0.01)),
    ]


def _objective(model: keras.Model):
    def objective(batch, training):
        loss = keras.losses.sparse_categorical_crossentropy(batch["labels"], model(batch["x"]), from_logits=True)
        # batch["blowup"] > 0 gives the body's kernel an overflowing gradient (and leaves the head's finite).
        loss += batch["blowup"] * tf.reduce_sum(model.get_layer("body").kernel)
        return loss, {"loss": (tf.reduce_sum(loss), tf.constant(float(BATCH)))}

    return objective


def _cluster() -> Cluster:
    return Cluster(tf.distribute.OneDeviceStrategy("/cpu:0"), True, 0, 1, False, "single")


def _trainer(cluster: Cluster, model, groups, tmp_path, name: str) -> Trainer:
    loop = LoopConfig(epochs=1, steps_per_epoch=STEPS, samples_per_step=BATCH, checkpoint_every_steps=STEPS,
                      keep_checkpoints=1, log_every_steps=STEPS)
    return Trainer(cluster, model, _objective(model), groups, tmp_path / name, tmp_path / f"{name}-logs", loop)


def _batches(blowup_at: int | None = None) -> list[dict[str, tf.Tensor]]:
    rng = np.random.default_rng(0)
    return [
        {"x": tf.constant(rng.standard_normal((BATCH, FEATURES)), tf.float32),
         "labels": tf.constant(rng.integers(0, CLASSES, BATCH), tf.int32),
         "blowup": tf.constant(OVERFLOWING if step == blowup_at else 0.0, tf.float32)}
        for step in range(STEPS)
    ]


def _train(tmp_path, name: str, scaled: bool, batches) -> tuple[keras.Model, list[ParamGroup]]:
    cluster = _cluster()
    with cluster.strategy.scope():  # where the job builds its models and optimizers
        model = _model()
        groups = _groups(model)
        if scaled:
            groups = loss_scaled(groups)
    trainer = _trainer(cluster, model, groups, tmp_path, name)
    stacked = {key: tf.stack([batch[key] for batch in batches]) for key in batches[0]}
    iterator = iter(cluster.strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(stacked)))
    for _ in batches:
        trainer.run_steps(iterator, 1)
    trainer.close()
    return model, groups


def test_two_groups_under_one_loss_scale_apply_the_unscaled_float32_updates(tmp_path):
    reference, _ = _train(tmp_path, "fp32", scaled=False, batches=_batches())
    scaled, groups = _train(tmp_path, "scaled", scaled=True, batches=_batches())
    (group,) = groups
    assert isinstance(group.optimizer, keras.optimizers.LossScaleOptimizer)
    assert float(group.optimizer.dynamic_scale.numpy()) == 2.0**15  # the loss really was scaled
    initial = _model().get_weights()
    for before, expected, actual in zip(initial, reference.get_weights(), scaled.get_weights(), strict=True):
        assert not np.array_equal(expected, before)  # every variable of both groups moved
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)


def test_a_non_finite_gradient_in_one_group_skips_the_step_for_both(tmp_path):
    _, groups = _train(tmp_path, "fp32", scaled=False, batches=_batches()[:1])
    model, scaled_groups = _train(tmp_path, "scaled", scaled=True, batches=_batches(blowup_at=0)[:1])
    np.testing.assert_array_equal(np.concatenate([w.ravel() for w in model.get_weights()]),
                                  np.concatenate([w.ravel() for w in _model().get_weights()]))
    (group,) = scaled_groups
    assert float(group.optimizer.dynamic_scale.numpy()) == 2.0**14
    inner = group.optimizer.inner_optimizer
    assert [int(g.optimizer.iterations.numpy()) for g in inner._groups] == [0, 0]  # schedules did not advance
    assert [int(g.optimizer.iterations.numpy()) for g in groups] == [1, 1]


def test_one_loss_scale_per_group_is_refused(tmp_path):
    cluster = _cluster()
    with cluster.strategy.scope():
        model = _model()
        groups = [ParamGroup(g.variables, keras.optimizers.LossScaleOptimizer(g.optimizer)) for g in _groups(model)]
    with pytest.raises(ValueError, match="one loss scale"):
        _trainer(cluster, model, groups, tmp_path, "refused")


def test_the_grouped_optimizer_state_is_checkpointed(tmp_path):
    _, groups = _train(tmp_path, "scaled", scaled=True, batches=_batches())
    checkpoint = tf.train.Checkpoint(optimizer=groups[0].optimizer)
    path = checkpoint.save(str(tmp_path / "opt" / "ckpt"))
    names = set(tf.train.load_checkpoint(path).get_variable_to_shape_map())
    assert any("dynamic_scale" in n for n in names), names
    assert any("group0" in n for n in names) and any("group1" in n for n in names), names
