"""The downstream task: the binary fish/duck split and one classifier training (pretrained or scratch)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np

from job.context import (
    Context,
    build_configured_backbone,
    check_batch,
    correct,
    dataset_fn,
    dtype_policy,
    mixed_precision,
    pretrained_backbone,
    probe_settings,
    sparse_ce,
    use_xla,
    weighted,
)
from job.errors import JobError
from job.evaluate import accuracy, confusion_matrix, fit_logistic, predict
from job.files import atomic_path
from job.pipelines import model_pixels, stratified_subset
from job.serving import export_classifier
from job.train import LoopConfig, ParamGroup, Trainer, WarmupCosine, loss_scaled, make_optimizer
from models.backbone import load_backbone_weights, pooled_block_features, transfer_features
from models.heads import classifier_head

log = logging.getLogger(__name__)

PRETRAINED, SCRATCH = "pretrained", "scratch"
AUTO = "auto"  # finetune.transfer_layers = ["auto"]: the depth chosen by cross-validation on the train labels
SELECTION_FOLDS = 4
LAYER_JOIN = "+"  # a candidate of several transfer layers, as named in downstream.transfer_selection


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
    """The two configured classes' train and val images (computed once per job)."""
    if "downstream_split" not in ctx.built:
        ctx.built["downstream_split"] = _select_split(ctx)
    return ctx.built["downstream_split"]


def _select_split(ctx: Context) -> Downstream:
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


@dataclass
class Learner:
    """The classifier of one kind (pretrained or scratch), its optimizers and traced train steps.

    Built once per job and reset for each run (seed, label fraction): tracing a MobileNetV2 train step
    takes ~30 s on a CPU, and the evaluation protocol trains up to 6 x seeds classifiers.
    """

    model: keras.Model
    backbone: keras.Model  # the whole backbone, into which pretrained weights load
    features: keras.Model  # pixels → what the head sees (finetune.transfer_layers), sharing its variables
    head: keras.Model
    groups: list[ParamGroup]
    schedules: list[WarmupCosine]
    objective: Callable
    initial_optimizer_state: list[list[np.ndarray]]
    step_fn: Callable | None = None  # traced on the first run (once per batch shape)

    def reset(self, ctx: Context, init: str, seed: int, warmup_steps: int, total_steps: int) -> None:
        """Fresh seeded weights (the pretrained backbone's when init is pretrained), optimizers and schedules."""
        keras.utils.set_random_seed(seed)
        fresh, _, _, _ = _classifier(ctx)  # plain variables, outside the strategy: only their values are used
        self.model.set_weights(fresh.get_weights())
        if init == PRETRAINED:
            load_backbone_weights(self.backbone, ctx.layout.backbone)
        for group, state in zip(self.groups, self.initial_optimizer_state, strict=True):
            for variable, value in zip(group.optimizer.variables, state, strict=True):
                variable.assign(value)
        for schedule in self.schedules:
            schedule.set_length(warmup_steps, total_steps)

    def init_head(self, ctx: Context, images: np.ndarray, labels: np.ndarray, seed: int) -> None:
        """LP-FT: set the head to a logistic regression fitted on the frozen features of the labelled images."""
        features = np.asarray(predict(self.features, images), np.float32)  # float16 under mixed precision
        kernel, bias = fit_logistic(features, labels, 2, seed=seed, **probe_settings(ctx))
        self.head.get_layer("logits").set_weights([kernel, bias])


def transfer_layers(ctx: Context) -> list[str]:
    """finetune.transfer_layers, with ["auto"] resolved (once per job) by `select_transfer_layers`."""
    layers = list(ctx.config.finetune.transfer_layers)
    if layers != [AUTO]:
        return layers
    if "transfer_selection" not in ctx.built:
        ctx.built["transfer_selection"] = select_transfer_layers(ctx)
    best = max(ctx.built["transfer_selection"].items(), key=lambda item: item[1])[0]
    return best.split(LAYER_JOIN)


def transfer_selection(ctx: Context) -> dict[str, float] | None:
    """Each candidate's cross-validated accuracy when the transfer layers were chosen ("auto"), else None."""
    transfer_layers(ctx)
    return ctx.built.get("transfer_selection")


def select_transfer_layers(ctx: Context) -> dict[str, float]:
    """Candidate transfer layers → k-fold cross-validated accuracy of a linear probe on the pretrained
    backbone's frozen pooled features, on the downstream *train* images (never val).

    Candidates: each of evaluate.depth_probe_layers alone, and each deeper one beside the shallowest (which
    keeps what a shallow network sees, such as colour, while the deeper one adds what pretraining learned).
    """
    cfg, e = ctx.config, ctx.config.evaluate
    split = downstream_split(ctx)
    by_depth = pooled_block_features(pretrained_backbone(ctx), e.depth_probe_layers)
    pooled = dict(zip(e.depth_probe_layers, predict(by_depth, split.train_images), strict=True))
    shallowest, *deeper = e.depth_probe_layers
    candidates = [[layer] for layer in e.depth_probe_layers] + [[shallowest, layer] for layer in deeper]
    folds = np.random.default_rng(cfg.runtime.seed).permutation(len(split.train_labels)) % SELECTION_FOLDS
    scores = {}
    for layers in candidates:
        x = np.concatenate([pooled[layer] for layer in layers], axis=1)
        correct_count = 0
        for fold in range(SELECTION_FOLDS):
            train, held = folds != fold, folds == fold
            kernel, bias = fit_logistic(x[train], split.train_labels[train], 2, seed=cfg.runtime.seed,
                                        **probe_settings(ctx))
            correct_count += int(np.sum(np.argmax(x[held] @ kernel + bias, -1) == split.train_labels[held]))
        scores[LAYER_JOIN.join(layers)] = correct_count / len(split.train_labels)
    log.info("transfer layers by %d-fold cross-validation on the train labels: %s", SELECTION_FOLDS,
             ", ".join(f"{name} {score:.3f}" for name, score in scores.items()))
    return scores


def _classifier(ctx: Context) -> tuple[keras.Model, keras.Model, keras.Model, keras.Model]:
    """pixels → transfer features → 2-way head, randomly initialised (Keras' global seed).

    Returns the classifier, the whole backbone, the feature model and the head.
    """
    backbone = build_configured_backbone(ctx, weights="none")
    features = transfer_features(backbone, transfer_layers(ctx))  # names checked by job.config.validate
    head = classifier_head(features.output_shape[-1], 2, ctx.config.model.classifier_dropout)
    pixels = keras.Input(backbone.input_shape[1:], name="pixels")
    return keras.Model(pixels, head(features(pixels)), name="classifier"), backbone, features, head


def _learner(ctx: Context, init: str) -> Learner:
    """The job's Learner for `init`, built on first use."""
    key = f"learner/{init}"
    if key in ctx.built:
        return ctx.built[key]
    f = ctx.config.finetune
    transfer_layers(ctx)  # an "auto" choice fits probes: outside the strategy's scope
    mixed = mixed_precision(ctx)
    with ctx.cluster.strategy.scope(), dtype_policy(mixed):
        model, backbone, features, head = _classifier(ctx)
        if init == PRETRAINED and f.freeze_batchnorm:
            for layer in features._flatten_layers(include_self=False, recursive=True):
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False  # Keras runs a non-trainable BatchNormalization in inference mode
        schedules = []

        def optimizer(scale: float):
            schedule = WarmupCosine(f.learning_rate * scale, 0, 1)
            schedules.append(schedule)
            return make_optimizer(f.optimizer, schedule, f.weight_decay)

        if f.mode == "linear":
            features.trainable = False
            groups = [ParamGroup(head.trainable_variables, optimizer(1.0))]
        elif f.backbone_lr_scale != 1.0 and init == PRETRAINED:  # a random backbone has nothing to preserve
            groups = [
                ParamGroup(head.trainable_variables, optimizer(1.0)),
                ParamGroup(features.trainable_variables, optimizer(f.backbone_lr_scale)),
            ]
        else:
            groups = [ParamGroup(model.trainable_variables, optimizer(1.0))]
        if mixed:
            groups = loss_scaled(groups)  # one loss scale for the backbone's and the head's gradients
        for group in groups:
            group.optimizer.build(group.variables)

    def objective(batch, training):
        logits = model(model_pixels(batch["images"]), training=training)
        loss = sparse_ce(batch["labels"], logits)
        return loss * batch["weights"], {
            "loss": weighted(loss, batch["weights"]),
            "accuracy": weighted(correct(batch["labels"], logits), batch["weights"]),
        }

    state = [[v.numpy() for v in g.optimizer.variables] for g in groups]
    ctx.built[key] = Learner(model, backbone, features, head, groups, schedules, objective, state)
    return ctx.built[key]


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
    # A few labels still get finetune.min_steps steps, in finetune.epochs epochs that each pass over them
    # several times: per-epoch evaluation and checkpoints then cost the same at every label fraction.
    one_pass = math.ceil(len(subset) / batch)
    steps, epochs = max(one_pass, math.ceil(f.min_steps / f.epochs)), f.epochs
    log.info("downstream %s: %d labelled images, %d epochs of %d steps", directory.name, len(subset), epochs, steps)

    learner = _learner(ctx, init)
    learner.reset(ctx, init, seed, warmup_steps=int(f.warmup_epochs * steps), total_steps=epochs * steps)
    if init == PRETRAINED and f.head_init == "probe":  # a random backbone's features have nothing to probe
        learner.init_head(ctx, images, labels, seed)
    model = learner.model

    def evaluator(epoch: int, writer) -> dict[str, float]:
        return {"accuracy": accuracy(predict(model, split.val_images), split.val_labels)}

    loop = LoopConfig(
        epochs=epochs, steps_per_epoch=steps, samples_per_step=batch,
        checkpoint_every_steps=cfg.runtime.checkpoint_every_steps, keep_checkpoints=cfg.runtime.keep_checkpoints,
        log_every_steps=cfg.runtime.log_every_steps, patience=f.early_stopping_patience, monitor="accuracy",
        xla=use_xla(ctx), fresh_batchnorm=init == SCRATCH,
    )
    trainer = Trainer(ctx.cluster, model, learner.objective, learner.groups, directory,
                      layout.tensorboard("finetune") / directory.name, loop, step_fn=learner.step_fn)
    learner.step_fn = trainer.step_fn
    result = trainer.fit(
        dataset_fn(images, labels, np.arange(len(labels)), batch, steps if steps > one_pass else 0, ctx,
                   rotations=False),
        evaluator,
    )
    trainer.finalize(use_best=False)
    trainer.close()
    logits = predict(model, split.val_images)
    predicted = np.argmax(logits, -1)
    if ctx.cluster.is_chief and init == PRETRAINED and fraction == f.label_fraction and seed == cfg.runtime.seed:
        with atomic_path(layout.classifier) as tmp:
            model.save(tmp)
        export_classifier(layout.classifier, layout.classifier_savedmodel, cfg.data.downstream_names)
    return ctx.finish(directory, {
        "init": init,
        "mode": f.mode,
        "transfer_layers": transfer_layers(ctx),
        "head_init": f.head_init if init == PRETRAINED else "random",
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


