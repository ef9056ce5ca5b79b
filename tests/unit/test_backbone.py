"""Tests for models.backbone: the configured MobileNetV2 and its features pooled by depth."""

from __future__ import annotations

import numpy as np
import pytest

from models.backbone import build_backbone, pooled_block_features, transfer_features
from models.mobilenet_layers import mobilenet_v2_layer_names, stage_of


@pytest.mark.parametrize("input_scale", [1, 2])
def test_pooled_block_features_share_the_backbone_preprocessing(input_scale):
    backbone = build_backbone(32, alpha=0.35, stem_stride=1, input_scale=input_scale)
    by_depth = pooled_block_features(backbone, ["block_2_add", "out_relu"])
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
    shallow, deepest = by_depth(images)
    assert shallow.shape == (3, 8)  # block 2 of MobileNetV2 α 0.35 has 8 channels
    # The last block pooled is exactly what the backbone returns: same rescaling, upsampling and weights.
    np.testing.assert_allclose(np.asarray(deepest), np.asarray(backbone(images)), rtol=1e-5, atol=1e-6)


def test_unknown_layer_is_named():
    backbone = build_backbone(32, alpha=0.35)
    with pytest.raises(ValueError, match="block_99_add"):
        pooled_block_features(backbone, ["block_2_add", "block_99_add"])


def test_transfer_features_concatenate_pooled_layers_and_stop_at_the_deepest():
    backbone = build_backbone(32, alpha=0.35, stem_stride=1)
    assert transfer_features(backbone, ["out_relu"]) is backbone
    features = transfer_features(backbone, ["block_2_add", "block_5_add"])
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
    shallow, deeper = pooled_block_features(backbone, ["block_2_add", "block_5_add"])(images)
    np.testing.assert_allclose(np.asarray(features(images)), np.concatenate([shallow, deeper], -1), rtol=1e-5)
    names = {layer.name for layer in features._flatten_layers(include_self=False, recursive=True)}
    assert "block_5_add" in names and "block_6_expand" not in names and "out_relu" not in names
    # The same variables as the backbone's: a change there is a change here.
    before = np.asarray(features(images))
    stem = backbone.get_layer(index=-2).get_layer("Conv1")
    stem.kernel.assign(stem.kernel * 2.0)
    assert not np.allclose(np.asarray(features(images)), before)


@pytest.mark.parametrize("alpha", [0.35, 1.0])
def test_static_layer_names_are_mobilenet_v2s(alpha):
    """The names config validation checks evaluate.depth_probe_layers against, without building a model."""
    backbone = build_backbone(32, alpha=alpha)
    body = next(layer for layer in backbone.layers if layer.name.startswith("mobilenet"))
    assert {layer.name for layer in body.layers[1:]} == mobilenet_v2_layer_names()


def test_stages_follow_keras_layer_order():
    """stage_of, which config validation orders layer keys by, never decreases along MobileNetV2's layers, and
    takes every value from the stem (0) to out_relu's stage."""
    body = next(layer for layer in build_backbone(32, alpha=0.35).layers if layer.name.startswith("mobilenet"))
    stages = [stage_of(layer.name) for layer in body.layers[1:]]
    assert stages == sorted(stages) and set(stages) == set(range(stages[-1] + 1))
    assert stage_of("Conv1") == 0 and stage_of("block_2_add") == 3 and stage_of("out_relu") == stages[-1] == 18
