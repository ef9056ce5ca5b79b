"""The rotation pretext task: model (backbone, rotation head, colour-order head, online probe), objective, data, and
its stage."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from job import console, testhooks
from job.config import DataConfig, ModelConfig, PretextConfig, RuntimeConfig
from job.context import Context
from job.data import Dataset
from job.distribute import Cluster
from job.files import atomic_path
from job.losses import correct, sparse_ce, weighted
from job.pipelines import COLOUR_ORDERS, NUM_ROTATIONS, model_pixels, one_pass_steps, random_subset, rotate_four
from job.precision import dtype_policy, mixed_precision, use_xla
from job.probes import accuracy, cross_entropy, predict
from job.serving import export_rotation_model
from job.task import (
    Task,
    build_optimizer,
    check_batch,
    configured_backbone,
    dataset_fn,
    decay_exempt,
    loop_config,
    train_store,
)
from job.train import ParamGroup, WarmupCosine
from models.backbone import transfer_features, variables_through
from models.heads import classifier_head, rotation_head

log = logging.getLogger(__name__)

COLOUR_ORDER_HEAD = "colour_order_head"
ROTATION_EXAMPLES = 4  # val images shown in four rotations in TensorBoard
ROTATIONS_TAG, PREDICTIONS_TAG = "val/rotations", "val/rotation_predictions"


@dataclass
class PretextTask(Task):
    """The pretext model and how to train it: built once, used by the pretrain stage and the benchmark."""

    backbone: keras.Model
    rotation_model: keras.Model  # pixels → rotation logits
    train_indices: np.ndarray

    @property
    def optimizer(self) -> keras.optimizers.Optimizer:
        return self.groups[0].optimizer


def pretext_task(ctx: Context) -> PretextTask:
    """The stage's pretext task: `build_pretext_task` on its config sections, dataset and cluster."""
    cfg = ctx.config
    return build_pretext_task(cfg.pretext, cfg.model, cfg.data, cfg.runtime, ctx.dataset, ctx.cluster)


def build_pretext_task(p: PretextConfig, model_cfg: ModelConfig, data_cfg: DataConfig, runtime: RuntimeConfig,
                       data: Dataset, cluster: Cluster) -> PretextTask:
    """Build the rotation model (backbone, rotation head, colour-order head if pretext.colour_order_weight, online
    probe) under the cluster's strategy, its objective, optimizer, inputs and validation."""
    check_batch(cluster, p.batch_images, "pretext.batch_images")
    train_indices = random_subset(len(data.train), p.max_images, runtime.seed)
    steps = p.steps_per_epoch or one_pass_steps(len(train_indices), p.batch_images)
    mixed = mixed_precision(runtime, cluster)
    with cluster.strategy.scope(), dtype_policy(mixed):
        keras.utils.set_random_seed(runtime.seed)
        backbone = configured_backbone(model_cfg, data_cfg.image_size)
        head_input = transfer_features(backbone, [p.head_layer])  # the backbone itself at "out_relu"
        dim = head_input.output_shape[-1]
        pixels = keras.Input(backbone.input_shape[1:], name="pixels")
        features = head_input(pixels)
        rotation_logits = rotation_head(dim, model_cfg.head_hidden_units)(features)
        probe_logits = classifier_head(dim, len(data.wnids), name="online_probe")(keras.ops.stop_gradient(features))
        outputs = [rotation_logits, probe_logits]
        if p.colour_order_weight:
            outputs.append(classifier_head(dim, len(COLOUR_ORDERS), name=COLOUR_ORDER_HEAD)(features))
        model = keras.Model(pixels, outputs, name="pretext")
        schedule = WarmupCosine(p.learning_rate, int(p.warmup_epochs * steps), p.epochs * steps)
        optimizer = build_optimizer(p, schedule, decay_exempt("pretext.weight_decay_exempt", p.weight_decay_exempt,
                                                              model.weights))
        if mixed:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    use_probe = p.online_probe

    def objective(batch, training):
        rotation, probe, *colour = model(model_pixels(batch["images"]), training=training)
        weights = batch["weights"]
        upright = weights * tf.cast(tf.equal(batch["rotations"], 0), tf.float32)
        rotation_loss = sparse_ce(batch["rotations"], rotation)
        probe_loss = sparse_ce(batch["labels"], probe)
        per_example = rotation_loss * weights + (probe_loss * upright if use_probe else 0.0)
        metrics = {
            "loss": weighted(rotation_loss, weights),
            "rotation_accuracy": weighted(correct(batch["rotations"], rotation), weights),
        }
        if colour:
            colour_loss = sparse_ce(batch["colour_orders"], colour[0])
            per_example += p.colour_order_weight * colour_loss * weights
            metrics["colour_order_loss"] = weighted(colour_loss, weights)
            metrics["colour_order_accuracy"] = weighted(correct(batch["colour_orders"], colour[0]), weights)
        if use_probe:
            metrics["online_probe_accuracy"] = weighted(correct(batch["labels"], probe), upright)
        return per_example, metrics

    loop = loop_config(
        runtime, epochs=p.epochs, steps_per_epoch=steps, samples_per_step=NUM_ROTATIONS * p.batch_images,
        patience=p.early_stopping_patience, monitor="rotation_accuracy", xla=use_xla(runtime, cluster),
        eval_every_epochs=p.eval_every_epochs,
    )
    make_dataset = dataset_fn(train_store(data, data_cfg), data.train.labels, train_indices, p.batch_images,
                              p.steps_per_epoch, data=data_cfg, seed=runtime.seed, rotations=True,
                              min_crop_area=p.min_crop_area,
                              shuffled_colours=p.shuffled_colour_fraction if p.colour_order_weight else 0.0)
    rotation_model = keras.Model(pixels, rotation_logits, name="rotation_model")
    val_indices = random_subset(len(data.val), p.val_max_images, runtime.seed)

    @functools.cache
    def val_set() -> tuple[np.ndarray, np.ndarray]:  # read on the first validation (the benchmark never does)
        return np.asarray(data.val.images[val_indices]), data.val.labels[val_indices]

    @functools.cache
    def colour_val_set() -> tuple[np.ndarray, np.ndarray]:  # the colour-order task's, built once like val_set
        return every_colour_order(val_set()[0])

    def evaluator(epoch: int, writer) -> dict[str, float]:
        val_images, val_labels = val_set()
        (rotation, probe, *_), angles = predict(model, val_images, rotations=True)
        metrics = {"rotation_accuracy": accuracy(rotation, angles), "loss": cross_entropy(rotation, angles)}
        if use_probe:
            metrics["online_probe_accuracy"] = accuracy(probe[angles == 0], val_labels)
        if p.colour_order_weight:
            shuffled, orders = colour_val_set()
            colour = predict(model, shuffled)[2]
            metrics["colour_order_loss"] = cross_entropy(colour, orders)
            metrics["colour_order_accuracy"] = accuracy(colour, orders)
        _rotation_summary(writer, model, val_images[:ROTATION_EXAMPLES])
        return metrics

    # pretext.frozen_through: the layers up to it keep their initial weights (their BN statistics still update).
    frozen = {id(v) for v in variables_through(backbone, p.frozen_through)} if p.frozen_through else set()
    trained = [v for v in model.trainable_variables if id(v) not in frozen]
    return PretextTask(model, objective, [ParamGroup(trained, optimizer)], make_dataset, evaluator, loop, backbone,
                       rotation_model, train_indices)


def pretrain(ctx: Context) -> dict:
    """Rotation pretext training; exports the backbone and the rotation model."""
    layout, p = ctx.layout, ctx.config.pretext
    if (done := ctx.completed(layout.pretext)) is not None:
        log.info("pretrain: complete in %s, skipping (use --force to redo)", layout.pretext)
        return done
    started = time.perf_counter()  # the stage's wall time: timing.pretext_other_s is what training leaves
    task = pretext_task(ctx)
    log.info(
        "pretrain: %d images x %d rotations%s, %d steps/epoch%s, %s, %s (%s), mixed precision %s",
        len(task.train_indices), NUM_ROTATIONS, _colour_note(p), task.loop.steps_per_epoch,
        _epoch_note(p, len(task.train_indices)),
        console.count(p.epochs, "epoch"),
        console.count(ctx.cluster.num_replicas, "replica"), ctx.cluster.kind,
        mixed_precision(ctx.config.runtime, ctx.cluster),
    )
    trainer = task.trainer(ctx.cluster, layout.pretext, layout.tensorboard("pretext"))
    result = trainer.fit(task.dataset_fn, task.evaluator)
    log.info("pretrain: exporting the backbone and the rotation model (.keras files and a SavedModel)...")
    trainer.finalize(use_best=True)
    # The best epoch's validation, already measured on these weights; evaluated again only when it is not known.
    final = trainer.best_record() or task.evaluator(result.epochs, tf.summary.create_noop_writer())
    trainer.close()
    testhooks.chief_delay(ctx.cluster, "the pretrain exports")
    if ctx.cluster.is_chief:
        layout.export.mkdir(parents=True, exist_ok=True)
        for model, path in ((task.backbone, layout.backbone), (task.rotation_model, layout.rotation_model)):
            with atomic_path(path) as tmp:  # a stop signal mid-save leaves the previous export
                model.save(tmp)
        export_rotation_model(layout.rotation_model, layout.rotation_savedmodel)
    return ctx.finish(layout.pretext, {
        "val_rotation_accuracy": final["rotation_accuracy"],
        "online_probe_val_accuracy": final.get("online_probe_accuracy"),
        "val_colour_order_accuracy": final.get("colour_order_accuracy"),
        "epochs": result.epochs,
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "samples_per_sec": result.samples_per_sec,
        "train_images": int(len(task.train_indices)),
        "stopped_early": result.stopped_early,
        "history": result.history,
    })


def every_colour_order(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, H, W, 3] each shown in one colour order, in turn (image i in COLOUR_ORDERS[i % 6]), and the
    orders: the colour-order task's val set, every order equally often."""
    orders = np.arange(len(images)) % len(COLOUR_ORDERS)
    channels = np.asarray(COLOUR_ORDERS)[orders][:, None, None, :]
    return np.take_along_axis(np.asarray(images), channels, axis=3), orders


def _colour_note(p: PretextConfig) -> str:
    """The colour-order task, when it is on."""
    if not p.colour_order_weight:
        return ""
    return (f" ({p.shuffled_colour_fraction:.0%} of them in another colour order, its loss weighted "
            f"{p.colour_order_weight:g}: pretext.colour_order_weight)")


def _epoch_note(p: PretextConfig, images: int) -> str:
    """How an epoch of fixed steps (pretext.steps_per_epoch) covers this set, when not in one pass."""
    if not p.steps_per_epoch or p.steps_per_epoch == one_pass_steps(images, p.batch_images):
        return ""
    seen = p.steps_per_epoch * p.batch_images
    share = f"{seen:,} of the {images:,} images" if seen < images else f"{seen / images:.2f} passes over the images"
    return f" (pretext.steps_per_epoch: {share} an epoch)"


def _rotation_summary(writer, model, images: np.ndarray) -> None:
    """TensorBoard, at the writer's default step (the trainer's global step): a few val images in four rotations,
    and a text table of each one's true and predicted angle at that step (a tag keeps its first description)."""
    if not len(images):
        return
    (rotation, *_), angles = predict(model, images, rotations=True)
    predicted = np.argmax(rotation, -1) * 90
    rotated, _ = rotate_four(np.asarray(images))
    count = len(images)
    description = (f"{count} val images in four rotations: images 1-{count} upright, then the same rotated 90°, "
                   f"180° and 270° counter-clockwise; each one's predicted angle at this step: {PREDICTIONS_TAG}")
    rows = [f"| {i + 1} | {a * 90}° | {p}° | {'yes' if a * 90 == p else 'no'} |"
            for i, (a, p) in enumerate(zip(angles, predicted))]
    table = "\n".join(["| image | true | predicted | correct |", "|---|---|---|---|", *rows])
    with writer.as_default():
        tf.summary.image(ROTATIONS_TAG, rotated, max_outputs=len(rotated), description=description)
        tf.summary.text(PREDICTIONS_TAG, table, description="true → predicted angle of each image of val/rotations")
