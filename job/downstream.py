"""The downstream task: the binary fish/duck split and one classifier training (pretrained or scratch)."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend.common import global_state  # keras.utils.set_random_seed's state, set without TF's seed
from keras.src.random import seed_generator
from keras.src.utils import rng_utils

from job import console
from job.config import Config, ModelConfig
from job.context import Context, pretrained_backbone, probe_settings
from job.errors import JobError
from job.files import atomic_path
from job.losses import correct, sparse_ce, weighted
from job.pipelines import model_pixels, one_pass_steps, stratified_subset
from job.precision import dtype_policy, mixed_precision, use_xla
from job.probes import (
    CV_FOLDS,
    accuracy,
    confusion_matrix,
    cross_entropy,
    cross_validated_accuracy,
    fit_logistic,
    fold_ids,
    predict,
)
from job.serving import export_classifier
from job.task import (
    NO_WEIGHTS,
    Task,
    build_optimizer,
    check_batch,
    configured_backbone,
    dataset_fn,
    decay_exempt,
    loop_config,
)
from job.train import DatasetFn, Evaluator, LoopConfig, ParamGroup, WarmupCosine, loss_scaled
from models.backbone import FINAL_LAYER, load_model, pooled_block_features, transfer_features
from models.heads import ROTATION_HEAD, classifier_head, rotation_head
from models.mobilenet_layers import stage_of

log = logging.getLogger(__name__)

PRETRAINED, SCRATCH = "pretrained", "scratch"
S4L = "s4l"  # finetune.mode: fine-tuning jointly with the rotation loss on all train images
UNLABELLED_SEED_OFFSET = 1  # S4L's unlabelled batches are shuffled apart from the labelled ones
AUTO = "auto"  # finetune.transfer_layers = ["auto"]: the depth chosen by cross-validation on the train labels
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
class Networks:
    """The downstream networks of one mode, sharing one backbone's variables."""

    classifier: keras.Model  # pixels → 2 logits
    backbone: keras.Model  # the whole backbone, into which pretrained weights load
    features: keras.Model  # pixels → what the head sees (finetune.transfer_layers), sharing its variables
    head: keras.Model
    rotation: keras.Model | None  # "s4l": pixels → 4 rotation logits, through the backbone up to pretext.head_layer
    trained: keras.Model  # what the trainer updates and checkpoints: the classifier (and the rotation model)


@dataclass
class Learner:
    """The networks of one kind (pretrained or scratch) and mode, their optimizers and traced train step; each
    downstream run is a `Task` of them (`task`).

    Built once per job and reset for each run (seed, label fraction): tracing a MobileNetV2 train step
    takes ~30 s on a CPU, and the evaluation protocol trains up to 6 x seeds classifiers.
    """

    nets: Networks
    groups: list[ParamGroup]
    schedules: list[WarmupCosine]
    objective: Callable
    initial_optimizer_state: list[list[np.ndarray]]
    step_fn: Callable | None = None  # traced on the first run (once per batch shape)

    @property
    def model(self) -> keras.Model:
        return self.nets.classifier

    def task(self, inputs: DatasetFn, evaluator: Evaluator, loop: LoopConfig) -> Task:
        """One run of these networks: trains (and checkpoints) `nets.trained` on `inputs`."""
        return Task(self.nets.trained, self.objective, self.groups, inputs, evaluator, loop)

    def reset(self, ctx: Context, init: str, mode: str, seed: int, warmup_steps: int, total_steps: int) -> None:
        """Fresh seeded weights (the pretrained backbone's and rotation head's when init is pretrained),
        optimizers and schedules."""
        self.nets.trained.set_weights(_initial_weights(ctx, mode, seed))  # and the random generators seeded
        if init == PRETRAINED:
            self.nets.backbone.set_weights(pretrained_backbone(ctx).get_weights())
            if self.nets.rotation is not None:
                self.nets.rotation.get_layer(ROTATION_HEAD).set_weights(_pretrained_rotation_head(ctx))
        for group, state in zip(self.groups, self.initial_optimizer_state, strict=True):
            for variable, value in zip(group.optimizer.variables, state, strict=True):
                variable.assign(value)
        for schedule in self.schedules:
            schedule.set_length(warmup_steps, total_steps)

    def init_head(self, ctx: Context, images: np.ndarray, labels: np.ndarray, seed: int) -> None:
        """LP-FT: set the head to a logistic regression fitted on the frozen features of the labelled images."""
        features = np.asarray(predict(self.nets.features, images), np.float32)  # float16 under mixed precision
        kernel, bias = fit_logistic(features, labels, 2, seed=seed, **probe_settings(ctx))
        self.nets.head.get_layer("logits").set_weights([kernel, bias])


def finetune_seeds(config: Config) -> list[int]:
    """The finetune stage's seeds (finetune.seeds of them), which the scratch baseline repeats."""
    return [config.runtime.seed + i for i in range(config.finetune.seeds)]


def fraction_seeds(config: Config) -> dict[float, list[int]]:
    """Each of evaluate.label_fractions' seeds: evaluate.label_fraction_seeds of them (finetune.seeds when it is
    empty; a fraction listed twice gets the larger count)."""
    e = config.evaluate
    counts = e.label_fraction_seeds or [config.finetune.seeds] * len(e.label_fractions)
    seeds: dict[float, list[int]] = {}
    for fraction, count in zip(e.label_fractions, counts, strict=True):
        seeds[fraction] = max(seeds.get(fraction, []), [config.runtime.seed + i for i in range(count)], key=len)
    return seeds


def configured_seeds(config: Config) -> list[int]:
    """Every seed some downstream run of the protocol trains, ascending."""
    return sorted({*finetune_seeds(config), *(s for seeds in fraction_seeds(config).values() for s in seeds)})


def _initial_weights(ctx: Context, mode: str, seed: int) -> list[np.ndarray]:
    """The `mode` networks' random initial weights with Keras seeded by `seed`, built once per job, mode and seed:
    every run of that seed (each label fraction, pretrained or scratch) starts from them. Building a throwaway
    MobileNetV2 for each run cost seconds, and collecting its garbage more (the gap after each downstream run).

    Leaves the random generators as `keras.utils.set_random_seed(seed)` and that build leave them, as every run
    always started. TensorFlow's seed is set only to build: setting it clears TensorFlow's kernel cache, and every
    traced function (the train step, the evaluation's inference) was then optimised again on its next call,
    3-5 s a run on a CPU. So the first call builds every configured seed's weights (the requested one last).
    """
    key = _initial_weights_key(mode, seed)
    if key in ctx.built:
        _seed_host_generators(seed)
        return ctx.built[key]
    others = [s for s in configured_seeds(ctx.config) if s != seed and _initial_weights_key(mode, s) not in ctx.built]
    for each in [*others, seed]:
        keras.utils.set_random_seed(each)
        # Plain variables, outside the strategy: only their values are used.
        nets = _networks(ctx.config.model, ctx.config.data.image_size, transfer_layers(ctx), mode,
                         ctx.config.pretext.head_layer)
        ctx.built[_initial_weights_key(mode, each)] = nets.trained.get_weights()
    return ctx.built[key]


def _initial_weights_key(mode: str, seed: int) -> str:
    return f"initial_weights/{mode}/{seed}"


def _seed_host_generators(seed: int) -> None:
    """`keras.utils.set_random_seed(seed)` without TensorFlow's seed (whose setting clears TensorFlow's kernel
    cache): Python's, NumPy's and Keras' global generators. A run's TensorFlow randomness is stateless or
    explicitly seeded (the input pipeline, dropout through Keras' seed generators, the probe's initializer)."""
    random.seed(seed)
    np.random.seed(seed)
    global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, seed)
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)


def _pretrained_rotation_head(ctx: Context) -> list[np.ndarray]:
    """The pretext task's rotation-head weights (model/rotation_model.keras), read once per job."""
    if "rotation_head" not in ctx.built:
        if not ctx.layout.rotation_model.is_file():
            raise JobError(f"{ctx.layout.rotation_model} is missing (finetune.mode = \"s4l\" starts from the pretext "
                           "task's rotation head): run `python -m job pretrain` with this --output first.")
        saved = load_model(ctx.layout.rotation_model)
        ctx.built["rotation_head"] = saved.get_layer(ROTATION_HEAD).get_weights()
    return ctx.built["rotation_head"]


def transfer_layers(ctx: Context) -> list[str]:
    """finetune.transfer_layers, with ["auto"] resolved (once per job) by `select_transfer_layers`."""
    layers = list(ctx.config.finetune.transfer_layers)
    if layers != [AUTO]:
        return layers
    if "transfer_selection" not in ctx.built:
        ctx.built["transfer_selection"] = select_transfer_layers(ctx)
    chosen = chosen_candidate(ctx.built["transfer_selection"], len(downstream_split(ctx).train_labels),
                              ctx.config.finetune.transfer_tolerance_se)
    return chosen.split(LAYER_JOIN)


def chosen_candidate(scores: dict[str, float], examples: int, tolerance_se: float) -> str:
    """The deepest candidate (by its deepest layer's block) whose cross-validated accuracy lies within
    `tolerance_se` standard errors of the best score (its binomial standard error over `examples`); among those
    as deep, the better scored. 0: the best.

    Candidates that a frozen linear probe cannot tell apart carry the same linearly available information; the
    deeper one carries more pretrained layers into the fine-tune, which the probe does not see.
    """
    if tolerance_se <= 0:
        return max(scores, key=scores.get)
    best = max(scores.values())
    floor = best - tolerance_se * math.sqrt(best * (1.0 - best) / examples)

    def depth(name: str) -> int:
        return max(stage_of(layer) for layer in name.split(LAYER_JOIN))

    return max((name for name, score in scores.items() if score >= floor), key=lambda name: (depth(name), scores[name]))


def transfer_selection(ctx: Context) -> dict[str, float] | None:
    """Each candidate's cross-validated accuracy when the transfer layers were chosen ("auto"), else None."""
    transfer_layers(ctx)
    return ctx.built.get("transfer_selection")


def select_transfer_layers(ctx: Context) -> dict[str, float]:
    """Candidate transfer layers → k-fold cross-validated accuracy of a linear probe on the pretrained
    backbone's frozen pooled features, on the downstream *train* images (never val).

    Candidates: each of evaluate.depth_probe_layers up to pretext.head_layer (the pretext never trained the layers
    past it) alone, and each deeper one beside the shallowest (which keeps what a shallow network sees, such as
    colour, while the deeper one adds what pretraining learned).
    """
    cfg, e = ctx.config, ctx.config.evaluate
    split = downstream_split(ctx)
    trained = [layer for layer in e.depth_probe_layers if stage_of(layer) <= stage_of(cfg.pretext.head_layer)]
    probed = trained or e.depth_probe_layers
    by_depth = pooled_block_features(pretrained_backbone(ctx), probed)
    pooled = dict(zip(probed, predict(by_depth, split.train_images), strict=True))
    shallowest, *deeper = probed
    candidates = [[layer] for layer in probed] + [[shallowest, layer] for layer in deeper]
    folds = fold_ids(len(split.train_labels), CV_FOLDS, cfg.runtime.seed)
    scores = {
        LAYER_JOIN.join(layers): cross_validated_accuracy(
            np.concatenate([pooled[layer] for layer in layers], axis=1), split.train_labels, 2, folds,
            seed=cfg.runtime.seed, **probe_settings(ctx))
        for layers in candidates
    }
    log.info("transfer layers by %d-fold cross-validation on the train labels: %s", CV_FOLDS,
             ", ".join(f"{name} {score:.3f}" for name, score in scores.items()))
    return scores


def _networks(model_cfg: ModelConfig, image_size: int, layers: list[str], mode: str,
              rotation_layer: str = FINAL_LAYER) -> Networks:
    """pixels → features at `layers` → 2-way head (and, for "s4l", → the backbone up to `rotation_layer`, the
    pretext's pretext.head_layer → rotation head), randomly initialised (Keras' global seed)."""
    backbone = configured_backbone(model_cfg, image_size, weights=NO_WEIGHTS)
    features = transfer_features(backbone, layers)  # names checked by job.config.validate
    head = classifier_head(features.output_shape[-1], 2, model_cfg.classifier_dropout)
    pixels = keras.Input(backbone.input_shape[1:], name="pixels")
    classifier = keras.Model(pixels, head(features(pixels)), name="classifier")
    if mode != S4L:
        return Networks(classifier, backbone, features, head, None, classifier)
    rotation_features = transfer_features(backbone, [rotation_layer])
    rotation_logits = rotation_head(rotation_features.output_shape[-1],
                                    model_cfg.head_hidden_units)(rotation_features(pixels))
    rotation = keras.Model(pixels, rotation_logits, name="rotation_model")
    trained = keras.Model(pixels, [classifier(pixels), rotation(pixels)], name="s4l")
    return Networks(classifier, backbone, features, head, rotation, trained)


def _unique(variables: list) -> list:
    """Variables in order, each once (the transfer features share the backbone's)."""
    seen: set[int] = set()
    return [v for v in variables if not (id(v) in seen or seen.add(id(v)))]


def _learner(ctx: Context, init: str, mode: str) -> Learner:
    """The job's Learner for `init` and `mode`, built on first use."""
    key = f"learner/{init}/{mode}"
    if key in ctx.built:
        return ctx.built[key]
    f = ctx.config.finetune
    layers = transfer_layers(ctx)  # an "auto" choice fits probes: outside the strategy's scope
    mixed = mixed_precision(ctx.config.runtime, ctx.cluster)
    with ctx.cluster.strategy.scope(), dtype_policy(mixed):
        nets = _networks(ctx.config.model, ctx.config.data.image_size, layers, mode, ctx.config.pretext.head_layer)
        if init == PRETRAINED and f.freeze_batchnorm:
            for layer in nets.backbone._flatten_layers(include_self=False, recursive=True):
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False  # Keras runs a non-trainable BatchNormalization in inference mode
        schedules = []
        exempt = decay_exempt("finetune.weight_decay_exempt", f.weight_decay_exempt, nets.trained.weights)

        def optimizer(scale: float):
            schedule = WarmupCosine(f.learning_rate * scale, 0, 1)
            schedules.append(schedule)
            return build_optimizer(f, schedule, exempt)

        trunk = nets.features if nets.rotation is None else nets.backbone  # what the loss reaches
        heads = nets.head.trainable_variables + (nets.rotation.get_layer(ROTATION_HEAD).trainable_variables
                                                 if nets.rotation is not None else [])
        if mode == "linear":
            nets.features.trainable = False
            groups = [ParamGroup(nets.head.trainable_variables, optimizer(1.0))]
        elif f.backbone_lr_scale != 1.0 and init == PRETRAINED:  # a random backbone has nothing to preserve
            groups = [
                ParamGroup(heads, optimizer(1.0)),
                ParamGroup(_unique(trunk.trainable_variables), optimizer(f.backbone_lr_scale)),
            ]
        else:
            groups = [ParamGroup(_unique(nets.trained.trainable_variables), optimizer(1.0))]
        if mixed:
            groups = loss_scaled(groups)  # one loss scale for the backbone's and the head's gradients
        for group in groups:
            group.optimizer.build(group.variables)

    classifier, rotation, rotation_weight = nets.classifier, nets.rotation, f.s4l_rotation_weight

    def objective(batch, training):
        logits = classifier(model_pixels(batch["images"]), training=training)
        loss = sparse_ce(batch["labels"], logits)
        metrics = {
            "loss": weighted(loss, batch["weights"]),
            "accuracy": weighted(correct(batch["labels"], logits), batch["weights"]),
        }
        per_example = loss * batch["weights"]
        if rotation is not None:  # S4L: plus the rotation loss on this step's unlabelled images
            angles, weights = batch["unlabelled_rotations"], batch["unlabelled_weights"]
            rotation_logits = rotation(model_pixels(batch["unlabelled_images"]), training=training)
            rotation_loss = sparse_ce(angles, rotation_logits)
            total, count = weighted(rotation_loss, weights)
            # Added to every labelled example: their average then carries the mean rotation loss, weighted.
            per_example += rotation_weight * total / tf.maximum(count, 1.0)
            metrics["rotation_loss"] = (total, count)
            metrics["rotation_accuracy"] = weighted(correct(angles, rotation_logits), weights)
        return per_example, metrics

    state = [[v.numpy() for v in g.optimizer.variables] for g in groups]
    ctx.built[key] = Learner(nets, groups, schedules, objective, state)
    return ctx.built[key]


def labelled_dataset_fn(cfg: Config, images: np.ndarray, labels: np.ndarray, batch: int, steps: int) -> DatasetFn:
    """A downstream run's labelled batches (`steps` a epoch; 0: one pass): flipped and cropped as data.crop_padding
    and finetune.min_crop_area say, the same for either initialisation; no rotations."""
    return dataset_fn(images, labels, np.arange(len(labels)), batch, steps, data=cfg.data, seed=cfg.runtime.seed,
                      rotations=False, min_crop_area=cfg.finetune.min_crop_area)


def _s4l_dataset_fn(ctx: Context, labelled: Callable, steps: int) -> Callable:
    """Zip each labelled batch with finetune.s4l_images unlabelled images (all downstream train images, labels
    unused) in four rotations: the S4L step sees both."""
    split, cfg = downstream_split(ctx), ctx.config
    check_batch(ctx.cluster, cfg.finetune.s4l_images, "finetune.s4l_images")
    images = split.train_images
    unlabelled = dataset_fn(images, np.zeros(len(images), np.int32), np.arange(len(images)), cfg.finetune.s4l_images,
                            steps, data=cfg.data, seed=cfg.runtime.seed + UNLABELLED_SEED_OFFSET, rotations=True)

    def make(epochs: range, start_step: int, context) -> tf.data.Dataset:
        def merge(batch, extra):
            return {**batch, "unlabelled_images": extra["images"], "unlabelled_rotations": extra["rotations"],
                    "unlabelled_weights": extra["weights"]}

        pair = (labelled(epochs, start_step, context), unlabelled(epochs, start_step, context))
        return tf.data.Dataset.zip(pair).map(merge)

    return make


def train_downstream(ctx: Context, init: str, fraction: float, seed: int, mode: str | None = None) -> dict:
    """Train the fish/duck classifier from the pretrained backbone or from scratch, in `mode` (default
    finetune.mode); returns its results."""
    cfg, layout, f = ctx.config, ctx.layout, ctx.config.finetune
    mode = mode or f.mode
    directory = layout.downstream(init, mode, fraction, seed)
    if (done := ctx.completed(directory)) is not None:
        log.info("downstream %s: complete in %s, skipping (use --force to redo)", directory.name, directory)
        return done
    started = time.perf_counter()  # the run's wall time (timing.downstream_s): tracing, training, exports
    split = downstream_split(ctx)
    subset = stratified_subset(split.train_labels, fraction, seed)
    images, labels = split.train_images[subset], split.train_labels[subset]
    batch = min(f.batch_size, len(subset))
    batch -= batch % ctx.cluster.num_replicas
    check_batch(ctx.cluster, batch, "finetune.batch_size")
    # A few labels still get finetune.min_steps steps, in finetune.epochs epochs that each pass over them
    # several times: per-epoch evaluation and checkpoints then cost the same at every label fraction.
    steps, epochs = max(one_pass_steps(len(subset), batch), math.ceil(f.min_steps / f.epochs)), f.epochs
    log.info("downstream %s: %d labelled images, %s of %s", directory.name, len(subset),
             console.count(epochs, "epoch"), console.count(steps, "step"))

    learner = _learner(ctx, init, mode)
    learner.reset(ctx, init, mode, seed, warmup_steps=int(f.warmup_epochs * steps), total_steps=epochs * steps)
    if init == PRETRAINED and f.head_init == "probe":  # a random backbone's features have nothing to probe
        learner.init_head(ctx, images, labels, seed)
    model = learner.model

    def evaluator(epoch: int, writer) -> dict[str, float]:
        logits = predict(model, split.val_images)
        return {"accuracy": accuracy(logits, split.val_labels), "loss": cross_entropy(logits, split.val_labels)}

    loop = loop_config(
        cfg.runtime, epochs=epochs, steps_per_epoch=steps, samples_per_step=batch, patience=f.early_stopping_patience,
        monitor="accuracy", xla=use_xla(cfg.runtime, ctx.cluster), fresh_batchnorm=init == SCRATCH,
    )
    labelled = labelled_dataset_fn(cfg, images, labels, batch, steps)  # one pass (padded) or min_steps' repeats
    inputs = _s4l_dataset_fn(ctx, labelled, steps) if mode == S4L else labelled
    task = learner.task(inputs, evaluator, loop)
    trainer = task.trainer(ctx.cluster, directory, layout.tensorboard("finetune") / directory.name,
                           step_fn=learner.step_fn)
    learner.step_fn = trainer.step_fn
    result = trainer.fit(task.dataset_fn, task.evaluator)
    trainer.finalize(use_best=False)
    trainer.close()
    logits = predict(model, split.val_images)
    predicted = np.argmax(logits, -1)
    if (ctx.cluster.is_chief and init == PRETRAINED and mode == f.mode and fraction == f.label_fraction
            and seed == cfg.runtime.seed):
        log.info("downstream %s: saving %s and its SavedModel...", directory.name, layout.classifier)
        with atomic_path(layout.classifier) as tmp:
            model.save(tmp)
        export_classifier(layout.classifier, layout.classifier_savedmodel, cfg.data.downstream_names)
    return ctx.finish(directory, {
        "init": init,
        "mode": mode,
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
        "wall_seconds": time.perf_counter() - started,
        "history": result.history,
    })


