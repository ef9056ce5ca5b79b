"""BatchNorm moving statistics corrected for Keras' (0, 1) start, for evaluation during and after training."""

from __future__ import annotations

import contextlib

import keras
import numpy as np

MIN_BN_RESIDUE = 1e-7  # below this the initial BN statistics no longer matter


def _batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [
        layer for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]


def debias_batchnorm(model: keras.Model, updates: int) -> list:
    """Replace each trainable BN layer's moving mean/variance m_t by its bias-corrected value.

    Keras starts moving statistics at mean 0, variance 1 and updates m_t = r*m_(t-1) + (1-r)*batch, so
    after t updates the initial values still weigh r**t. When real variances are small (they are, at
    initialisation) that residue dominates and inference-mode outputs collapse in short runs;
    (m_t - r**t * init) / (1 - r**t) is the exact average of the batch statistics seen.
    Returns what is needed to undo it.
    """
    saved = []
    for layer in _batchnorm_layers(model):
        residue = layer.momentum**updates
        if residue < MIN_BN_RESIDUE or residue >= 1.0:
            continue
        mean, variance = layer.moving_mean, layer.moving_variance
        saved.append((mean, variance, mean.numpy(), variance.numpy()))
        mean.assign(mean.numpy() / (1.0 - residue))
        variance.assign(np.maximum((variance.numpy() - residue) / (1.0 - residue), 0.0))
    return saved


@contextlib.contextmanager
def debiased_batchnorm(model: keras.Model, updates: int):
    """Inside the block, BN moving statistics are bias-corrected (see `debias_batchnorm`)."""
    saved = debias_batchnorm(model, updates)
    try:
        yield
    finally:
        for mean, variance, old_mean, old_variance in saved:
            mean.assign(old_mean)
            variance.assign(old_variance)
