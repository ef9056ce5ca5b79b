"""FusedBatchNormalization computes what Keras' BatchNormalization computes, in training and inference, and the
backbone uses it, saves it and loads it."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.backbone import build_backbone, load_model
from models.fused_batchnorm import FusedBatchNormalization

MOMENTUM = 0.9
CHANNELS = 6
SHAPE = (8, 5, 5, CHANNELS)


def _pair(**kwargs) -> tuple[keras.layers.BatchNormalization, FusedBatchNormalization]:
    """Keras' layer and the fused one, built alike with the same non-trivial weights and statistics."""
    rng = np.random.default_rng(0)
    reference = keras.layers.BatchNormalization(momentum=MOMENTUM, **kwargs)
    fused = FusedBatchNormalization(momentum=MOMENTUM, **kwargs)
    for layer in (reference, fused):
        layer.build(SHAPE)
    weights = [rng.normal(1.0, 0.3, CHANNELS), rng.normal(0.0, 0.5, CHANNELS), rng.normal(0.0, 1.0, CHANNELS),
               rng.uniform(0.5, 2.0, CHANNELS)]  # gamma, beta, moving mean, moving variance
    for layer in (reference, fused):
        layer.set_weights([w.astype(np.float32) for w in weights])
    return reference, fused


def _images(shape=SHAPE, seed: int = 1) -> tf.Tensor:
    return tf.constant(np.random.default_rng(seed).normal(2.0, 3.0, shape).astype(np.float32))


def _train_step(layer, x):
    """Outputs and the gradients of a weighted sum of them, with respect to the input, gamma and beta."""
    weights = tf.constant(np.random.default_rng(2).normal(size=x.shape).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * weights)
    return y, tape.gradient(loss, [x, layer.gamma, layer.beta])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "xla"])
def test_a_training_step_matches_keras_outputs_gradients_and_moving_statistics(compiled):
    reference, fused = _pair()
    x = _images()
    step = tf.function(_train_step, jit_compile=True) if compiled else _train_step
    expected, expected_grads = _train_step(reference, x)
    y, grads = step(fused, x)
    np.testing.assert_allclose(y.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-3, atol=1e-4)
    for got, want in ((fused.moving_mean, reference.moving_mean), (fused.moving_variance, reference.moving_variance)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(fused.moving_mean.numpy(), _pair()[1].moving_mean.numpy())  # the statistics moved


def test_inference_and_unfusable_calls_take_keras_own_path():
    reference, fused = _pair()
    x = _images()
    np.testing.assert_array_equal(fused(x, training=False).numpy(), reference(x, training=False).numpy())
    fused.trainable = reference.trainable = False  # a frozen layer runs in inference mode in training too
    np.testing.assert_array_equal(fused(x, training=True).numpy(), reference(x, training=True).numpy())
    flat_reference, flat_fused = keras.layers.BatchNormalization(), FusedBatchNormalization()  # not images
    flat = _images((16, CHANNELS))
    np.testing.assert_allclose(flat_fused(flat, training=True).numpy(), flat_reference(flat, training=True).numpy(),
                               rtol=1e-6, atol=1e-6)


def test_mixed_precision_keeps_the_compute_dtype_and_float32_statistics():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        reference, fused = _pair()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x = tf.cast(_images(), tf.float16)
    y, expected = fused(x, training=True), reference(x, training=True)
    assert y.dtype == tf.float16 and fused.moving_mean.dtype == "float32"
    np.testing.assert_allclose(y.numpy(), expected.numpy(), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(fused.moving_variance.numpy(), reference.moving_variance.numpy(), rtol=1e-3)


def test_the_backbone_normalises_with_fused_layers_and_saves_and_loads_them(tmp_path):
    backbone = build_backbone(32, alpha=0.35)
    norms = [layer for layer in backbone._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 52 and all(isinstance(layer, FusedBatchNormalization) for layer in norms)
    assert all(layer.momentum == MOMENTUM for layer in norms)
    backbone(_images((4, 32, 32, 3)) * 20 + 128, training=True)  # moving statistics no longer (0, 1)
    backbone.save(tmp_path / "backbone.keras")
    loaded = load_model(tmp_path / "backbone.keras")
    images = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(loaded(images).numpy(), backbone(images).numpy())
    assert sum(isinstance(layer, FusedBatchNormalization) for layer in loaded._flatten_layers()) == len(norms)


def test_the_module_imports_no_tensorflow_so_the_backbone_builds_on_other_keras_backends():
    """infra/gpu_appetite.py builds models.backbone on Keras' JAX backend, on machines without TensorFlow."""
    import ast
    import inspect

    import models.fused_batchnorm as module

    tree = ast.parse(inspect.getsource(module))
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    top_level = [alias.name for node in imports for alias in node.names]
    top_level += [node.module or "" for node in imports if isinstance(node, ast.ImportFrom)]
    assert "keras" in top_level and not any(name.startswith("tensorflow") for name in top_level)
