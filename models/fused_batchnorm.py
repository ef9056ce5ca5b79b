"""Keras' BatchNormalization with its training step in one fused TensorFlow kernel.

Keras 3 normalises a training batch with separate ops (a mean, a squared difference, a second mean, the
normalisation): on a CPU those column reductions over [batch x height x width, channels] dominate a
MobileNetV2 step. TensorFlow's FusedBatchNormV3 (oneDNN on a CPU, cuDNN on a GPU) computes the statistics,
normalises and, in the backward pass, differentiates in one kernel each. On 2 CPU cores a MobileNetV2 step
(α 0.5, 64 px, 256 samples, every layer trained) ran 1.9x faster, and the cpu-real bench's fed loop 1.5x
(docs/throughput.md). Inference, masks, synchronized or renormalised layers, non-image inputs and Keras' other
backends take Keras' own path, so the layer computes what Keras' does and saves and loads as it does.
"""

from __future__ import annotations

import keras

MIN_FUSED_EPSILON = 1.001e-5  # FusedBatchNormV3 rejects a smaller epsilon
IMAGE_RANK = 4  # [batch, height, width, channels]


@keras.saving.register_keras_serializable(package="models")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization whose training-mode call on NHWC images is one fused kernel."""

    def _fusable(self, inputs, training, mask) -> bool:
        return bool(keras.backend.backend() == "tensorflow" and training and self.trainable and mask is None
                    and not self.synchronized and not self.renorm
                    and len(inputs.shape) == IMAGE_RANK and self.axis in (-1, IMAGE_RANK - 1)
                    and self.center and self.scale and self.epsilon >= MIN_FUSED_EPSILON)

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf  # here, not above: infra/gpu_appetite.py builds the backbone on Keras' JAX backend

        x = tf.cast(inputs, tf.float32)  # as Keras does: statistics in float32 whatever the compute dtype
        empty = tf.constant([], tf.float32)
        outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=tf.cast(self.gamma, tf.float32), offset=tf.cast(self.beta, tf.float32), mean=empty,
            variance=empty, epsilon=self.epsilon, exponential_avg_factor=1.0, data_format="NHWC", is_training=True,
        )
        # The kernel returns the variance with Bessel's correction; Keras' moving statistics average the biased one.
        count = tf.cast(tf.size(x, out_type=tf.int64) // tf.shape(x, out_type=tf.int64)[-1], tf.float32)
        variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + tf.cast(mean, self.moving_mean.dtype) * (1 - momentum))
        self.moving_variance.assign(
            self.moving_variance * momentum + tf.cast(variance, self.moving_variance.dtype) * (1 - momentum))
        return tf.cast(outputs, self.compute_dtype)
