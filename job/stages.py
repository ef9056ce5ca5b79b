"""The job's stages, each inputs → outputs in the run directory, skipped when already complete.

pretrain:  train images (labels unused) → rotation-pretrained backbone (model/backbone.keras)
finetune:  backbone + fish/duck labels → classifier (model/classifier.keras), one run per seed
evaluate:  backbone → linear probe, k-NN, scratch baseline, label efficiency → report/
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from job import report
from job.config import Config
from job.data import Dataset, load_dataset
from job.distribute import Cluster
from job.errors import JobError
from job.evaluate import accuracy, confusion_matrix, knn_accuracy, linear_probe, predict
from job.layout import RunLayout
from job.pipelines import (
    BatchPlan,
    Sharding,
    plan_epoch,
    random_subset,
    rotate_four,
    stratified_subset,
    train_dataset,
)
from job.train import LoopConfig, ParamGroup, Trainer, WarmupCosine, make_optimizer, write_json
from models.backbone import build_backbone, load_backbone_weights
from models.heads import classifier_head, rotation_head

log = logging.getLogger(__name__)

PRETRAINED, SCRATCH = "pretrained", "scratch"
ROTATION_EXAMPLES = 4  # val images shown in four rotations in TensorBoard


@dataclass
class Context:
    """What every stage needs: the config, where to write, where the data is, and the cluster."""

    config: Config
    layout: RunLayout
    data_path: Path
    cluster: Cluster
    force: bool = False
    _forced: set[Path] = field(default_factory=set)

    @cached_property
    def dataset(self) -> Dataset:
        cfg = self.config.data
        return load_dataset(self.data_path, cfg.image_size, Path(cfg.cache_dir).expanduser(), cfg.decode_threads)

    def dataset_summary(self) -> dict:
        d = self.dataset
        return {
            "train_images": len(d.train),
            "val_images": len(d.val),
            "skipped_images": len(d.skipped),
            "skipped_files": d.skipped[: report.LISTED_SKIPPED],
            "classes": len(d.wnids),
            "decode_images_per_sec": (len(d.train) + len(d.val)) / d.decode_seconds if d.decode_seconds else None,
        }

    def completed(self, stage_dir: Path) -> dict | None:
        """The stage's done.json, or None when it must (re)run; `--force` clears each stage once."""
        if self.force and stage_dir not in self._forced:
            self._forced.add(stage_dir)
            if self.cluster.is_chief and stage_dir.exists():
                log.info("--force: discarding %s", stage_dir)
                shutil.rmtree(stage_dir)
            return None
        return read_done(stage_dir)

    def finish(self, stage_dir: Path, result: dict) -> dict:
        if self.cluster.is_chief:
            write_json(RunLayout.done(stage_dir), result)
        return result


def read_done(stage_dir: Path) -> dict | None:
    """A stage's results (its done.json), or None when it has not completed."""
    done = RunLayout.done(stage_dir)
    return json.loads(done.read_text()) if done.is_file() else None


# -- shared pieces ---------------------------------------------------------------------------------
def _mixed_precision(ctx: Context) -> bool:
    setting = ctx.config.runtime.mixed_precision
    return setting == "on" or (setting == "auto" and ctx.cluster.has_gpu)


def _xla(ctx: Context) -> bool:
    setting = ctx.config.runtime.xla
    return setting == "on" or (setting == "auto" and ctx.cluster.has_gpu)


def _backbone(ctx: Context, weights: str | None = None) -> keras.Model:
    m = ctx.config.model
    return build_backbone(
        ctx.config.data.image_size,
        alpha=m.alpha,
        weights=m.weights if weights is None else weights,
        bn_momentum=m.bn_momentum,
        stem_stride=m.stem_stride,
        input_scale=m.input_scale,
    )


def _check_batch(ctx: Context, batch: int, key: str) -> None:
    replicas = ctx.cluster.num_replicas
    if batch % replicas:
        raise JobError(f"{key} = {batch} does not split over {replicas} replicas: make it a multiple of {replicas}.")


def _sparse_ce(labels, logits):
    return tf.keras.losses.sparse_categorical_crossentropy(labels, tf.cast(logits, tf.float32), from_logits=True)


def _correct(labels, logits):
    return tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)


def _weighted(values, weights):
    return tf.reduce_sum(values * weights), tf.reduce_sum(weights)


def _dataset_fn(images, labels, indices, batch, steps, ctx: Context, rotations: bool):
    """(epoch, start_step, input_context) → this pipeline's tf.data.Dataset for that epoch."""
    seed, padding = ctx.config.runtime.seed, ctx.config.data.crop_padding

    def make(epoch: int, start_step: int, context) -> tf.data.Dataset:
        plan = plan_epoch(len(indices), batch, seed, epoch, steps)
        plan = BatchPlan(indices[plan.indices], plan.weights)
        return train_dataset(
            images, labels, plan, seed=seed, epoch=epoch, start_step=start_step, padding=padding,
            rotations=rotations, sharding=Sharding.from_input_context(context),
            prefetch=ctx.config.data.prefetch_batches,
        )

    return make


# -- pretrain --------------------------------------------------------------------------------------
@dataclass
class PretextTask:
    """The pretext model and how to train it: built once, used by the pretrain stage and the benchmark."""

    model: keras.Model  # pixels → [rotation logits, online-probe logits]
    backbone: keras.Model
    rotation_model: keras.Model  # pixels → rotation logits
    objective: Callable
    optimizer: keras.optimizers.Optimizer
    loop: LoopConfig
    train_indices: np.ndarray
    dataset_fn: Callable


def pretext_task(ctx: Context) -> PretextTask:
    """Build the rotation model (backbone, rotation head, online probe) under the cluster's strategy."""
    cfg, data, p = ctx.config, ctx.dataset, ctx.config.pretext
    _check_batch(ctx, p.batch_images, "pretext.batch_images")
    train_indices = random_subset(len(data.train), p.max_images, cfg.runtime.seed)
    steps = p.steps_per_epoch or math.ceil(len(train_indices) / p.batch_images)
    mixed = _mixed_precision(ctx)
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    with ctx.cluster.strategy.scope():
        keras.utils.set_random_seed(cfg.runtime.seed)
        backbone = _backbone(ctx)
        dim = backbone.output_shape[-1]
        pixels = keras.Input(backbone.input_shape[1:], name="pixels")
        features = backbone(pixels)
        rotation_logits = rotation_head(dim, cfg.model.head_hidden_units)(features)
        probe_logits = classifier_head(dim, len(data.wnids), name="online_probe")(keras.ops.stop_gradient(features))
        model = keras.Model(pixels, [rotation_logits, probe_logits], name="pretext")
        schedule = WarmupCosine(p.learning_rate, int(p.warmup_epochs * steps), p.epochs * steps)
        optimizer = make_optimizer(p.optimizer, schedule, p.weight_decay)
        if mixed:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    keras.mixed_precision.set_global_policy("float32")
    use_probe = p.online_probe

    def objective(batch, training):
        rotation, probe = model(tf.cast(batch["images"], tf.float32), training=training)
        weights = batch["weights"]
        upright = weights * tf.cast(tf.equal(batch["rotations"], 0), tf.float32)
        rotation_loss = _sparse_ce(batch["rotations"], rotation)
        probe_loss = _sparse_ce(batch["labels"], probe)
        per_example = rotation_loss * weights + (probe_loss * upright if use_probe else 0.0)
        metrics = {
            "loss": _weighted(rotation_loss, weights),
            "rotation_accuracy": _weighted(_correct(batch["rotations"], rotation), weights),
        }
        if use_probe:
            metrics["online_probe_accuracy"] = _weighted(_correct(batch["labels"], probe), upright)
        return per_example, metrics

    loop = LoopConfig(
        epochs=p.epochs, steps_per_epoch=steps, samples_per_step=4 * p.batch_images,
        checkpoint_every_steps=cfg.runtime.checkpoint_every_steps, keep_checkpoints=cfg.runtime.keep_checkpoints,
        log_every_steps=cfg.runtime.log_every_steps, patience=p.early_stopping_patience,
        monitor="rotation_accuracy", xla=_xla(ctx),
    )
    dataset_fn = _dataset_fn(
        data.train.images, data.train.labels, train_indices, p.batch_images, p.steps_per_epoch, ctx, rotations=True
    )
    rotation_model = keras.Model(pixels, rotation_logits, name="rotation_model")
    return PretextTask(model, backbone, rotation_model, objective, optimizer, loop, train_indices, dataset_fn)


def pretrain(ctx: Context) -> dict:
    """Rotation pretext training; exports the backbone and the rotation model."""
    layout, p = ctx.layout, ctx.config.pretext
    if (done := ctx.completed(layout.pretext)) is not None:
        log.info("pretrain: complete in %s, skipping (use --force to redo)", layout.pretext)
        return done
    data = ctx.dataset
    task = pretext_task(ctx)
    val_indices = random_subset(len(data.val), p.val_max_images, ctx.config.runtime.seed)
    val_images, val_labels = np.asarray(data.val.images[val_indices]), data.val.labels[val_indices]
    log.info(
        "pretrain: %d images x 4 rotations, %d steps/epoch, %d epochs, %d replicas (%s), mixed precision %s",
        len(task.train_indices), task.loop.steps_per_epoch, p.epochs, ctx.cluster.num_replicas, ctx.cluster.kind,
        _mixed_precision(ctx),
    )

    def evaluator(epoch: int, writer) -> dict[str, float]:
        (rotation, probe), angles = predict(task.model, val_images, rotations=True)
        metrics = {"rotation_accuracy": accuracy(rotation, angles)}
        if p.online_probe:
            metrics["online_probe_accuracy"] = accuracy(probe[angles == 0], val_labels)
        _rotation_summary(writer, task.model, val_images[:ROTATION_EXAMPLES], epoch)
        return metrics

    trainer = Trainer(
        ctx.cluster, task.model, task.objective, [ParamGroup(task.model.trainable_variables, task.optimizer)],
        layout.pretext, layout.tensorboard("pretext"), task.loop,
    )
    result = trainer.fit(task.dataset_fn, evaluator)
    trainer.finalize(use_best=True)
    final = evaluator(result.epochs, trainer.writer)
    trainer.close()
    if ctx.cluster.is_chief:
        layout.export.mkdir(parents=True, exist_ok=True)
        task.backbone.save(layout.backbone)
        task.rotation_model.save(layout.rotation_model)
    return ctx.finish(layout.pretext, {
        "val_rotation_accuracy": final["rotation_accuracy"],
        "online_probe_val_accuracy": final.get("online_probe_accuracy"),
        "epochs": result.epochs,
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "samples_per_sec": result.samples_per_sec,
        "train_images": int(len(task.train_indices)),
        "stopped_early": result.stopped_early,
        "history": result.history,
    })


def _rotation_summary(writer, model, images: np.ndarray, epoch: int) -> None:
    """TensorBoard image summary: a few val images in four rotations, with the predicted angles."""
    if not len(images):
        return
    (rotation, _), angles = predict(model, images, rotations=True)
    predicted = np.argmax(rotation, -1) * 90
    rotated, _ = rotate_four(np.asarray(images))
    description = "true → predicted angle: " + ", ".join(f"{a * 90}→{p}" for a, p in zip(angles, predicted))
    with writer.as_default(step=epoch + 1):
        tf.summary.image("val/rotations", rotated, max_outputs=len(rotated), description=description)


# -- downstream ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Downstream:
    """The binary downstream split: uint8 images and 0/1 labels (0 = first configured wnid)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray


def check_inputs(ctx: Context) -> None:
    """Fail fast on structural problems (before anything in the output is touched or trained)."""
    downstream_split(ctx)


def downstream_split(ctx: Context) -> Downstream:
    data, wnids = ctx.dataset, ctx.config.data.downstream_wnids
    classes = [data.class_index(w) for w in wnids]

    def pick(split):
        keep = np.flatnonzero(np.isin(split.labels, classes))
        return np.asarray(split.images[keep]), (split.labels[keep] == classes[1]).astype(np.int32)

    train_images, train_labels = pick(data.train)
    val_images, val_labels = pick(data.val)
    for name, labels, split in (("train", train_labels, "train/"), ("val", val_labels, "val/val_annotations.txt")):
        for c, wnid in enumerate(wnids):
            if not np.any(labels == c):
                        raise JobError(f"class {wnid} has no {name} images in {ctx.data_path}/{split}: add them or "
                               "choose other data.downstream_wnids.")
    return Downstream(train_images, train_labels, val_images, val_labels)


def train_downstream(ctx: Context, init: str, fraction: float, seed: int) -> dict:
    """Train the fish/duck classifier from the pretrained backbone or from scratch; returns its results."""
    cfg, layout, f = ctx.config, ctx.layout, ctx.config.finetune
    directory = layout.downstream(init, f.mode, fraction, seed)
    if (done := ctx.completed(directory)) is not None:
        return done
    split = downstream_split(ctx)
    subset = stratified_subset(split.train_labels, fraction, seed)
    images, labels = split.train_images[subset], split.train_labels[subset]
    batch = min(f.batch_size, len(subset))
    batch -= batch % ctx.cluster.num_replicas
    _check_batch(ctx, batch, "finetune.batch_size")
    steps = math.ceil(len(subset) / batch)
    epochs = max(f.epochs, math.ceil(f.min_steps / steps))
    log.info("downstream %s: %d labelled images, %d epochs of %d steps", directory.name, len(subset), epochs, steps)

    with ctx.cluster.strategy.scope():
        keras.utils.set_random_seed(seed)
        backbone = _backbone(ctx, weights="none")
        if init == PRETRAINED:
            load_backbone_weights(backbone, layout.backbone)
        head = classifier_head(backbone.output_shape[-1], 2, cfg.model.classifier_dropout)
        pixels = keras.Input(backbone.input_shape[1:], name="pixels")
        model = keras.Model(pixels, head(backbone(pixels)), name="classifier")
        total = epochs * steps

        def optimizer(scale: float):
            schedule = WarmupCosine(f.learning_rate * scale, int(f.warmup_epochs * steps), total)
            return make_optimizer(f.optimizer, schedule, f.weight_decay)

        if f.mode == "linear":
            backbone.trainable = False
            groups = [ParamGroup(head.trainable_variables, optimizer(1.0))]
        elif f.backbone_lr_scale != 1.0 and init == PRETRAINED:  # a random backbone has nothing to preserve
            groups = [
                ParamGroup(head.trainable_variables, optimizer(1.0)),
                ParamGroup(backbone.trainable_variables, optimizer(f.backbone_lr_scale)),
            ]
        else:
            groups = [ParamGroup(model.trainable_variables, optimizer(1.0))]

    def objective(batch, training):
        logits = model(tf.cast(batch["images"], tf.float32), training=training)
        loss = _sparse_ce(batch["labels"], logits)
        return loss * batch["weights"], {
            "loss": _weighted(loss, batch["weights"]),
            "accuracy": _weighted(_correct(batch["labels"], logits), batch["weights"]),
        }

    def evaluator(epoch: int, writer) -> dict[str, float]:
        return {"accuracy": accuracy(predict(model, split.val_images), split.val_labels)}

    loop = LoopConfig(
        epochs=epochs, steps_per_epoch=steps, samples_per_step=batch,
        checkpoint_every_steps=cfg.runtime.checkpoint_every_steps, keep_checkpoints=cfg.runtime.keep_checkpoints,
        log_every_steps=cfg.runtime.log_every_steps, patience=f.early_stopping_patience, monitor="accuracy",
        xla=_xla(ctx), fresh_batchnorm=init == SCRATCH,
    )
    trainer = Trainer(ctx.cluster, model, objective, groups, directory,
                      layout.tensorboard("finetune") / directory.name, loop)
    result = trainer.fit(
        _dataset_fn(images, labels, np.arange(len(labels)), batch, 0, ctx, rotations=False), evaluator
    )
    trainer.finalize(use_best=False)
    trainer.close()
    logits = predict(model, split.val_images)
    predicted = np.argmax(logits, -1)
    if ctx.cluster.is_chief and init == PRETRAINED and fraction == f.label_fraction and seed == cfg.runtime.seed:
        layout.export.mkdir(parents=True, exist_ok=True)
        model.save(layout.classifier)
    return ctx.finish(directory, {
        "init": init,
        "mode": f.mode,
        "label_fraction": fraction,
        "seed": seed,
        "train_images": int(len(subset)),
        "val_images": int(len(split.val_labels)),
        "val_accuracy": accuracy(logits, split.val_labels),
        "best_epoch_val_accuracy": result.best,
        "confusion_matrix": confusion_matrix(predicted, split.val_labels, 2),
        "val_predictions": predicted.tolist(),
        "epochs": result.epochs,
        "train_seconds": result.train_seconds,
        "history": result.history,
    })


def _seeds(ctx: Context) -> list[int]:
    return [ctx.config.runtime.seed + i for i in range(ctx.config.finetune.seeds)]


def finetune(ctx: Context) -> list[dict]:
    """The downstream task from the pretrained backbone, once per seed."""
    if not ctx.layout.backbone.is_file():
        raise JobError(f"{ctx.layout.backbone} is missing: run `python -m job pretrain` with this --output first.")
    return [train_downstream(ctx, PRETRAINED, ctx.config.finetune.label_fraction, s) for s in _seeds(ctx)]


# -- evaluate --------------------------------------------------------------------------------------
def evaluate(ctx: Context) -> dict:
    """Frozen-feature probes, scratch baseline and label efficiency; then metrics.json and report.md."""
    layout = ctx.layout
    pretext = read_done(layout.pretext)
    if pretext is None or not layout.backbone.is_file():
        raise JobError(f"{layout.backbone} is missing: run `python -m job pretrain` with this --output first.")
    if (done := ctx.completed(layout.evaluate)) is None or not layout.metrics.is_file():
        done = ctx.finish(layout.evaluate, _evaluations(ctx))
    metrics = report.build_metrics(pretext, done, ctx.dataset_summary())
    if ctx.cluster.is_chief:
        report.write_report(layout.report, metrics, _examples(ctx, done))
    return metrics


def _frozen_backbone(ctx: Context) -> keras.Model:
    backbone = _backbone(ctx, weights="none")
    load_backbone_weights(backbone, ctx.layout.backbone)
    return backbone


def _evaluations(ctx: Context) -> dict:
    cfg, e = ctx.config, ctx.config.evaluate
    split = downstream_split(ctx)
    backbone = _frozen_backbone(ctx)
    train_features, val_features = predict(backbone, split.train_images), predict(backbone, split.val_images)
    probe = dict(steps=e.probe_steps, learning_rate=e.probe_learning_rate, weight_decay=e.probe_weight_decay)
    result: dict = {
        "linear_probe_val_accuracy": linear_probe(
            train_features, split.train_labels, val_features, split.val_labels, 2, seed=cfg.runtime.seed, **probe
        ),
        "knn_val_accuracy": knn_accuracy(train_features, split.train_labels, val_features, split.val_labels, e.knn_k),
        "linear_probe_200_top1": None,
    }
    log.info("evaluate: linear probe %.4f, k-NN %.4f", result["linear_probe_val_accuracy"], result["knn_val_accuracy"])
    if e.linear_probe_200:
        data = ctx.dataset
        result["linear_probe_200_top1"] = linear_probe(
            predict(backbone, data.train.images), data.train.labels, predict(backbone, data.val.images),
            data.val.labels, len(data.wnids), seed=cfg.runtime.seed, **probe,
        )
        log.info("evaluate: %d-way linear probe top-1 %.4f", len(data.wnids), result["linear_probe_200_top1"])
    result["finetune"] = finetune(ctx)
    fractions = sorted(set(e.label_fractions))
    result["scratch"] = (
        [train_downstream(ctx, SCRATCH, cfg.finetune.label_fraction, s) for s in _seeds(ctx)]
        if e.scratch_baseline else []
    )
    result["label_efficiency"] = [
        {
            "fraction": fraction,
            "pretrained": [train_downstream(ctx, PRETRAINED, fraction, s)["val_accuracy"] for s in _seeds(ctx)],
            "scratch": [train_downstream(ctx, SCRATCH, fraction, s)["val_accuracy"] for s in _seeds(ctx)],
        }
        for fraction in fractions
    ]
    return result


def _examples(ctx: Context, evaluations: dict) -> report.Examples:
    """Images and predictions for the report's figures."""
    split, count = downstream_split(ctx), ctx.config.evaluate.report_examples
    rotation_model = keras.models.load_model(ctx.layout.rotation_model, compile=False)
    upright = np.asarray(ctx.dataset.val.images[: max(1, count // 4)])
    rotation_logits, angles = predict(rotation_model, upright, rotations=True)
    rotated, _ = rotate_four(upright)
    first = evaluations["finetune"][0]
    return report.Examples(
        rotated_images=rotated,
        rotation_true=angles * 90,
        rotation_predicted=np.argmax(rotation_logits, -1) * 90,
        val_images=split.val_images,
        val_true=split.val_labels,
        val_predicted=np.asarray(first["val_predictions"]),
        class_names=list(ctx.config.data.downstream_names),
        count=count,
    )
