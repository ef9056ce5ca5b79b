"""The downstream runs share one traced classifier per kind (job/downstream.py: Learner); each run must still
start from exactly the state a fresh process would give it: seeded weights, zeroed optimizers, its schedule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from job.config import load_config
from job.context import Context, build_configured_backbone
from job.distribute import make_cluster
from job.downstream import PRETRAINED, train_downstream
from job.layout import RunLayout
from tests.jobproc import TINY

pytestmark = pytest.mark.slow


def _context(data: Path, output: Path, cache: Path) -> Context:
    config = load_config("demo", [*TINY, f"data.cache_dir={cache}", "finetune.backbone_lr_scale=0.5"])
    return Context(config, RunLayout(output), data, make_cluster())


def _pretrained_backbone(ctx: Context, contexts: tuple[Context, ...]) -> None:
    """A stand-in for a pretrained backbone: one random backbone, saved where the pretrain stage saves it."""
    backbone = build_configured_backbone(ctx)
    for other in contexts:
        other.layout.backbone.parent.mkdir(parents=True, exist_ok=True)
        backbone.save(other.layout.backbone)


def test_a_reused_learner_trains_as_a_fresh_one(synth_zip, tmp_path):
    """The pretrained kind: two parameter groups (head, backbone at its own rate), the loaded backbone.

    The scratch kind runs the same reset; one kind keeps the test to two traces of the train step.
    """
    fresh = _context(synth_zip, tmp_path / "fresh", tmp_path / "cache")
    reused = _context(synth_zip, tmp_path / "reused", tmp_path / "cache")
    _pretrained_backbone(fresh, (fresh, reused))
    # The reused learner first trains another seed, which leaves its weights, both optimizers' moments and
    # its step counters far from a fresh start.
    before = train_downstream(reused, PRETRAINED, 1.0, seed=0)
    expected = train_downstream(fresh, PRETRAINED, 1.0, seed=1)
    actual = train_downstream(reused, PRETRAINED, 1.0, seed=1)

    assert [h["train_loss"] for h in before["history"]] != [h["train_loss"] for h in expected["history"]]
    assert actual["val_predictions"] == expected["val_predictions"]
    for got, want in zip(actual["history"], expected["history"], strict=True):
        np.testing.assert_allclose(got["train_loss"], want["train_loss"], rtol=1e-4)
        assert got["accuracy"] == want["accuracy"]
    np.testing.assert_allclose(actual["val_accuracy"], expected["val_accuracy"])


def test_lp_ft_starts_from_the_probe_and_keeps_frozen_batchnorm(synth_zip, tmp_path):
    """head_init = "probe": before any step, the classifier is the logistic regression on its frozen transfer
    features; freeze_batchnorm: fine-tuning leaves the pretrained BatchNorm statistics as they were."""
    import keras

    from job.downstream import _learner, downstream_split
    from job.evaluate import fit_logistic, predict

    config = load_config("demo", [*TINY, f"data.cache_dir={tmp_path / 'cache'}", "finetune.head_init='probe'",
                                  "finetune.freeze_batchnorm=true", "finetune.transfer_layers=['block_5_add']"])
    ctx = Context(config, RunLayout(tmp_path / "run"), synth_zip, make_cluster())
    _pretrained_backbone(ctx, (ctx,))
    split = downstream_split(ctx)
    learner = _learner(ctx, PRETRAINED)
    learner.reset(ctx, PRETRAINED, seed=3, warmup_steps=0, total_steps=4)
    learner.init_head(ctx, split.train_images, split.train_labels, seed=3)
    e = config.evaluate
    kernel, bias = fit_logistic(predict(learner.features, split.train_images), split.train_labels, 2,
                                steps=e.probe_steps, learning_rate=e.probe_learning_rate,
                                weight_decay=e.probe_weight_decay, seed=3)
    expected = predict(learner.features, split.val_images) @ kernel + bias
    np.testing.assert_allclose(predict(learner.model, split.val_images), expected, rtol=1e-4, atol=1e-4)

    norms = [layer for layer in learner.features._flatten_layers(include_self=False, recursive=True)
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and not any(layer.trainable for layer in norms)
    before = [np.asarray(layer.moving_mean).copy() for layer in norms]
    result = train_downstream(ctx, PRETRAINED, 1.0, seed=3)
    assert result["head_init"] == "probe" and result["transfer_layers"] == ["block_5_add"]
    for layer, mean in zip(norms, before, strict=True):
        np.testing.assert_array_equal(np.asarray(layer.moving_mean), mean)
