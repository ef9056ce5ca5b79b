"""The downstream task: the binary fish/duck split and one classifier training (pretrained or scratch)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from job.context import (
    Context,
    build_configured_backbone,
    check_batch,
    correct,
    dataset_fn,
    sparse_ce,
    use_xla,
    weighted,
)
from job.errors import JobError
from job.evaluate import accuracy, confusion_matrix, predict
from job.pipelines import stratified_subset
from job.train import LoopConfig, ParamGroup, Trainer, WarmupCosine, make_optimizer
from models.backbone import load_backbone_weights
from models.heads import classifier_head

log = logging.getLogger(__name__)

PRETRAINED, SCRATCH = "pretrained", "scratch"


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
    check_batch(ctx, batch, "finetune.batch_size")
    steps = math.ceil(len(subset) / batch)
    epochs = max(f.epochs, math.ceil(f.min_steps / steps))
    log.info("downstream %s: %d labelled images, %d epochs of %d steps", directory.name, len(subset), epochs, steps)

    with ctx.cluster.strategy.scope():
        keras.utils.set_random_seed(seed)
        backbone = build_configured_backbone(ctx, weights="none")
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
        loss = sparse_ce(batch["labels"], logits)
        return loss * batch["weights"], {
            "loss": weighted(loss, batch["weights"]),
            "accuracy": weighted(correct(batch["labels"], logits), batch["weights"]),
        }

    def evaluator(epoch: int, writer) -> dict[str, float]:
        return {"accuracy": accuracy(predict(model, split.val_images), split.val_labels)}

    loop = LoopConfig(
        epochs=epochs, steps_per_epoch=steps, samples_per_step=batch,
        checkpoint_every_steps=cfg.runtime.checkpoint_every_steps, keep_checkpoints=cfg.runtime.keep_checkpoints,
        log_every_steps=cfg.runtime.log_every_steps, patience=f.early_stopping_patience, monitor="accuracy",
        xla=use_xla(ctx), fresh_batchnorm=init == SCRATCH,
    )
    trainer = Trainer(ctx.cluster, model, objective, groups, directory,
                      layout.tensorboard("finetune") / directory.name, loop)
    result = trainer.fit(
        dataset_fn(images, labels, np.arange(len(labels)), batch, 0, ctx, rotations=False), evaluator
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


