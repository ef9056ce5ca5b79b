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
    """A stand-in for the pretrain stage's exports: one random backbone and rotation model, saved where it saves
    them."""
    import keras

    from models.backbone import transfer_features
    from models.heads import rotation_head

    backbone = build_configured_backbone(ctx)
    features = transfer_features(backbone, [ctx.config.pretext.head_layer])  # the pretext's head input
    pixels = keras.Input(backbone.input_shape[1:])
    rotation = keras.Model(pixels, rotation_head(features.output_shape[-1])(features(pixels)), name="rotation_model")
    for other in contexts:
        other.layout.backbone.parent.mkdir(parents=True, exist_ok=True)
        backbone.save(other.layout.backbone)
        rotation.save(other.layout.rotation_model)


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
    from job.probes import fit_logistic, predict

    config = load_config("demo", [*TINY, f"data.cache_dir={tmp_path / 'cache'}", "finetune.head_init='probe'",
                                  "finetune.freeze_batchnorm=true", "finetune.transfer_layers=['block_5_add']"])
    ctx = Context(config, RunLayout(tmp_path / "run"), synth_zip, make_cluster())
    _pretrained_backbone(ctx, (ctx,))
    split = downstream_split(ctx)
    learner = _learner(ctx, PRETRAINED, "finetune")
    learner.reset(ctx, PRETRAINED, "finetune", seed=3, warmup_steps=0, total_steps=4)
    learner.init_head(ctx, split.train_images, split.train_labels, seed=3)
    e = config.evaluate
    kernel, bias = fit_logistic(predict(learner.nets.features, split.train_images), split.train_labels, 2,
                                steps=e.probe_steps, learning_rate=e.probe_learning_rate,
                                weight_decay=e.probe_weight_decay, seed=3)
    expected = predict(learner.nets.features, split.val_images) @ kernel + bias
    np.testing.assert_allclose(predict(learner.model, split.val_images), expected, rtol=1e-4, atol=1e-4)

    norms = [layer for layer in learner.nets.features._flatten_layers(include_self=False, recursive=True)
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and not any(layer.trainable for layer in norms)
    before = [np.asarray(layer.moving_mean).copy() for layer in norms]
    result = train_downstream(ctx, PRETRAINED, 1.0, seed=3)
    assert result["head_init"] == "probe" and result["transfer_layers"] == ["block_5_add"]
    for layer, mean in zip(norms, before, strict=True):
        np.testing.assert_array_equal(np.asarray(layer.moving_mean), mean)


@pytest.mark.parametrize("head_layer", ["out_relu", "block_5_add"])
def test_s4l_trains_the_classifier_and_the_rotation_task_together(synth_zip, tmp_path, head_layer):
    """finetune.mode = "s4l": the rotation head starts as the pretext task's (on the pretext's head layer), every
    step also sees finetune.s4l_images unlabelled images in four rotations, and the rotation loss reaches the
    layers between the transfer cut and the head layer (which the classifier alone never trains)."""

    from job.downstream import S4L, _learner, _s4l_dataset_fn, downstream_split
    from job.probes import predict
    from job.task import dataset_fn
    from models.backbone import load_model, variables_through

    config = load_config("demo", [*TINY, f"data.cache_dir={tmp_path / 'cache'}", "finetune.mode='s4l'",
                                  "finetune.s4l_images=4", "finetune.transfer_layers=['block_2_add']",
                                  f"pretext.head_layer={head_layer}"])
    ctx = Context(config, RunLayout(tmp_path / "run"), synth_zip, make_cluster())
    _pretrained_backbone(ctx, (ctx,))
    split = downstream_split(ctx)

    labelled = dataset_fn(split.train_images, split.train_labels, np.arange(len(split.train_labels)), 8, 2,
                          data=config.data, seed=config.runtime.seed, rotations=False)
    batches = list(_s4l_dataset_fn(ctx, labelled, steps=2)(range(1), 0, None))
    assert len(batches) == 2 and batches[0]["images"].shape[0] == 8
    assert batches[0]["unlabelled_images"].shape[0] == 4 * 4
    np.testing.assert_array_equal(batches[0]["unlabelled_rotations"], np.repeat(np.arange(4), 4))

    learner = _learner(ctx, PRETRAINED, S4L)
    learner.reset(ctx, PRETRAINED, S4L, seed=0, warmup_steps=0, total_steps=4)
    saved = load_model(ctx.layout.rotation_model)
    images = split.val_images[:8]
    np.testing.assert_allclose(predict(learner.nets.rotation, images, rotations=True)[0],
                               predict(saved, images, rotations=True)[0], rtol=1e-4, atol=1e-4)
    # The layers past block_2_add, up to the head layer: only the rotation loss can move them.
    cut = {id(v) for v in variables_through(learner.nets.backbone, "block_2_add")}
    rotation_only = [v for v in variables_through(learner.nets.backbone, head_layer) if id(v) not in cut]
    last = [np.asarray(v).copy() for v in rotation_only[-2:]]

    result = train_downstream(ctx, PRETRAINED, 1.0, seed=0)
    assert result["mode"] == S4L and ctx.layout.downstream(PRETRAINED, S4L, 1.0, 0).is_dir()
    assert {"train_rotation_accuracy", "train_rotation_loss"} <= set(result["history"][0])
    assert any(not np.allclose(np.asarray(v), old) for v, old in zip(rotation_only[-2:], last, strict=True))


def test_finetune_weight_decay_exempt_reaches_every_group(synth_zip, tmp_path):
    """finetune.weight_decay_exempt: the head's and the backbone's optimizers (two groups at their own rates)
    both skip the decay of BatchNorm's scales and offsets, and shrink the other weights under a zero gradient."""
    import tensorflow as tf

    from job.downstream import _learner

    config = load_config("demo", [*TINY, f"data.cache_dir={tmp_path / 'cache'}", "finetune.backbone_lr_scale=0.5",
                                  "finetune.weight_decay=0.5", "finetune.weight_decay_exempt=['gamma', 'beta']"])
    ctx = Context(config, RunLayout(tmp_path / "run"), synth_zip, make_cluster())
    _pretrained_backbone(ctx, (ctx,))
    learner = _learner(ctx, PRETRAINED, "finetune")
    learner.reset(ctx, PRETRAINED, "finetune", seed=0, warmup_steps=0, total_steps=4)
    assert len(learner.groups) == 2
    for group in learner.groups:
        before = [np.asarray(v).copy() for v in group.variables]
        group.optimizer.apply_gradients([(tf.zeros_like(v), v) for v in group.variables])
        for variable, old in zip(group.variables, before, strict=True):
            kept = variable.path.endswith(("gamma", "beta")) or not old.any()  # zeros (biases) stay zero anyway
            assert np.array_equal(np.asarray(variable), old) == kept, variable.path


def test_linear_mode_trains_the_head_and_leaves_the_backbone(synth_zip, tmp_path):
    """finetune.mode = "linear": the head learns; every backbone variable, BatchNorm statistics included, is the
    pretrained one. Seed 1 (not runtime.seed): no classifier export, which this test does not need."""
    config = load_config("demo", [*TINY, f"data.cache_dir={tmp_path / 'cache'}", "finetune.mode='linear'"])
    ctx = Context(config, RunLayout(tmp_path / "run"), synth_zip, make_cluster())
    _pretrained_backbone(ctx, (ctx,))
    result = train_downstream(ctx, PRETRAINED, 1.0, seed=1)
    assert result["mode"] == "linear" and result["history"]
    nets = ctx.built[f"learner/{PRETRAINED}/linear"].nets
    trained_backbone, trained_head = nets.backbone.get_weights(), nets.head.get_weights()
    ctx.built[f"learner/{PRETRAINED}/linear"].reset(ctx, PRETRAINED, "linear", seed=1, warmup_steps=0,
                                                    total_steps=1)  # the state the run started from
    for trained, initial in zip(trained_backbone, nets.backbone.get_weights(), strict=True):
        np.testing.assert_array_equal(trained, initial)
    assert any(np.abs(trained - initial).max() > 0
               for trained, initial in zip(trained_head, nets.head.get_weights(), strict=True))


def test_auto_transfer_layers_weigh_only_what_the_pretext_trained_and_prefer_depth_within_the_tolerance(
        synth_zip, tmp_path):
    """["auto"] scores the probed layers up to pretext.head_layer (the layers past it keep their initial weights),
    and with a tolerance as wide as every score, takes the deepest candidate, the better scored at that depth."""
    from job.downstream import transfer_layers, transfer_selection

    config = load_config("demo", [*TINY, f"data.cache_dir={tmp_path / 'cache'}", "finetune.transfer_layers=['auto']",
                                  "pretext.head_layer='block_5_add'", "finetune.transfer_tolerance_se=1000",
                                  "evaluate.depth_probe_layers=['block_2_add', 'block_5_add', 'block_9_add', "
                                  "'out_relu']"])
    ctx = Context(config, RunLayout(tmp_path / "run"), synth_zip, make_cluster())
    _pretrained_backbone(ctx, (ctx,))
    scores = transfer_selection(ctx)
    assert set(scores) == {"block_2_add", "block_5_add", "block_2_add+block_5_add"}
    deepest = max(["block_5_add", "block_2_add+block_5_add"], key=scores.get)
    assert transfer_layers(ctx) == deepest.split("+")
