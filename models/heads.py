"""Small heads on pooled backbone features: rotation, classifier, online probe."""

from __future__ import annotations

import keras

NUM_ROTATIONS = 4
ROTATION_HEAD = "rotation_head"  # the layer name by which the rotation model's head is found again


def rotation_head(feature_dim: int, hidden_units: int = 0) -> keras.Model:
    """Features → 4 rotation logits (0/90/180/270 degrees); linear, or one hidden layer."""
    inputs = keras.Input((feature_dim,), name="features")
    x = inputs
    if hidden_units:
        x = keras.layers.Dense(hidden_units, name="hidden")(x)
        x = keras.layers.BatchNormalization(name="hidden_bn")(x)
        x = keras.layers.ReLU(name="hidden_relu")(x)
    logits = keras.layers.Dense(NUM_ROTATIONS, dtype="float32", name="rotation_logits")(x)
    return keras.Model(inputs, logits, name=ROTATION_HEAD)


def classifier_head(feature_dim: int, num_classes: int, dropout: float = 0.0, name: str = "classifier_head"):
    """Features → class logits: (dropout →) one dense layer. Also used as the online probe."""
    inputs = keras.Input((feature_dim,), name="features")
    x = keras.layers.Dropout(dropout, name="dropout")(inputs) if dropout else inputs
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=name)
