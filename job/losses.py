"""Per-example losses and metric sums of the training objectives (float32 whatever the compute dtype)."""

from __future__ import annotations

import tensorflow as tf


def sparse_ce(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Per-example cross-entropy of integer `labels` under `logits`, in float32."""
    return tf.keras.losses.sparse_categorical_crossentropy(labels, tf.cast(logits, tf.float32), from_logits=True)


def correct(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """1.0 where the arg-max of `logits` is the label, else 0.0."""
    return tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)


def weighted(values: tf.Tensor, weights: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(sum of values × weights, sum of weights): a metric the trainer averages over steps and replicas."""
    return tf.reduce_sum(values * weights), tf.reduce_sum(weights)
