"""The shape of every training (TF Model Garden's `Task`): a model, its inputs for an input context, an objective,
a validation and the loop's settings; and the builders they share, each given only its config section.

The pretext task (job/pretext.py) and each downstream run (job/downstream.py) are a `Task`; the trainer
(job/train.py) runs one without knowing which.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from job.config import DataConfig, FinetuneConfig, ModelConfig, PretextConfig, RuntimeConfig
from job.data import Dataset, encoded_train_images
from job.distribute import Cluster
from job.errors import JobError
from job.pipelines import BatchPlan, EncodedStore, ImageStore, Sharding, plan_epoch, train_epochs
from job.train import DatasetFn, Evaluator, LoopConfig, Objective, ParamGroup, Trainer, WarmupCosine, make_optimizer
from models.backbone import WeightsUnavailable, build_backbone

NO_WEIGHTS = "none"  # model.weights: random init
ENCODED_STORE = "encoded"  # data.store: the train images held as encoded bytes (job.pipelines.EncodedStore)


@dataclass
class Task:
    """One training: what the trainer updates and checkpoints, how, on what, and how it is validated."""

    model: keras.Model  # trained and checkpointed
    objective: Objective  # (batch, training) → (per-example loss, {metric: (sum, count)})
    groups: list[ParamGroup]  # the model's trainable variables and their optimizers
    dataset_fn: DatasetFn  # (epochs, start_step, input_context) → this input pipeline's dataset for those epochs
    evaluator: Evaluator  # (epoch, writer) → validation metrics
    loop: LoopConfig

    def trainer(self, cluster: Cluster, directory: Path, tensorboard_dir: Path, step_fn=None) -> Trainer:
        """A Trainer for this task, resuming from `directory`; `step_fn`: an earlier Trainer's traced step over the
        same model, objective and groups."""
        return Trainer(cluster, self.model, self.objective, self.groups, directory, tensorboard_dir, self.loop,
                       step_fn=step_fn)


def loop_config(runtime: RuntimeConfig, *, epochs: int, steps_per_epoch: int, samples_per_step: int, patience: int,
                monitor: str, xla: bool, fresh_batchnorm: bool = True, eval_every_epochs: int = 1) -> LoopConfig:
    """The loop's settings: the task's length and monitor, and runtime's checkpoint, log and steps-per-call cadence."""
    return LoopConfig(
        epochs=epochs, steps_per_epoch=steps_per_epoch, samples_per_step=samples_per_step,
        checkpoint_every_steps=runtime.checkpoint_every_steps, keep_checkpoints=runtime.keep_checkpoints,
        log_every_steps=runtime.log_every_steps, steps_per_loop=runtime.steps_per_loop, patience=patience,
        monitor=monitor, xla=xla, fresh_batchnorm=fresh_batchnorm, eval_every_epochs=eval_every_epochs,
    )


def train_store(dataset: Dataset, data: DataConfig) -> ImageStore | EncodedStore:
    """The dataset's train images in host memory as `data.store` says: decoded pixels, or encoded bytes decoded a
    batch at a time (the same pixels)."""
    if data.store == ENCODED_STORE:
        return EncodedStore(encoded_train_images(dataset, data.decode_threads), data.image_size)
    return ImageStore(dataset.train.images)


def dataset_fn(images: np.ndarray | ImageStore | EncodedStore, labels: np.ndarray, indices: np.ndarray, batch: int,
               steps: int, *, data: DataConfig, seed: int, rotations: bool, min_crop_area: float = 1.0,
               shuffled_colours: float = 0.0) -> DatasetFn:
    """(epochs, start_step, input_context) → this pipeline's tf.data.Dataset for those epochs (the first from
    start_step), over `indices` of `images` (an array, or a store from `train_store`) in batches of `batch`
    (`steps` a epoch; 0: one pass), augmented as `data` says, with crops of at least `min_crop_area` of an image's
    area and `shuffled_colours` of the samples in another colour order (`pipelines.train_epochs`), drawn from
    `seed`."""
    # once per task, shared by every fit's dataset
    store = images if isinstance(images, (ImageStore, EncodedStore)) else ImageStore(images)

    def plan(epoch: int) -> BatchPlan:
        planned = plan_epoch(len(indices), batch, seed, epoch, steps)
        return BatchPlan(indices[planned.indices], planned.weights)

    def make(epochs: range, start_step: int, context: tf.distribute.InputContext | None) -> tf.data.Dataset:
        return train_epochs(
            store, labels, plan, epochs, seed=seed, start_step=start_step, padding=data.crop_padding,
            min_crop_area=min_crop_area, rotations=rotations, shuffled_colours=shuffled_colours,
            sharding=Sharding.from_input_context(context),
            prefetch=data.prefetch_batches,
        )

    return make


def configured_backbone(model: ModelConfig, image_size: int, weights: str | None = None) -> keras.Model:
    """MobileNetV2 as `model` configures it, with `weights` (default model.weights); a JobError for weights
    that cannot be downloaded or do not fit."""
    weights = model.weights if weights is None else weights
    try:
        return build_backbone(
            image_size,
            alpha=model.alpha,
            weights=weights,
            bn_momentum=model.bn_momentum,
            stem_stride=model.stem_stride,
            input_scale=model.input_scale,
        )
    except WeightsUnavailable as err:
        raise JobError(f"model.weights = 'imagenet' could not be downloaded ({err}): connect to the network, "
                       "or use model.weights = 'none' or the path of a weights file.") from err
    except (ValueError, OSError) as err:
        if weights == NO_WEIGHTS:
            raise
        raise JobError(f"model.weights = {weights!r} does not fit this model ({err}): use weights saved for "
                       f"model.alpha = {model.alpha}, or model.weights = 'none'.") from err


def build_optimizer(section: PretextConfig | FinetuneConfig, schedule: WarmupCosine,
                    exempt: list | None = None) -> keras.optimizers.Optimizer:
    """The section's optimizer (`optimizer`, `weight_decay`) following `schedule`, not decaying `exempt`
    (decay_exempt's)."""
    return make_optimizer(section.optimizer, schedule, section.weight_decay, exempt)


def decay_exempt(key: str, patterns: list[str], variables: list) -> list:
    """The `variables` (a model's weights) whose path holds any of `patterns` (config key `key`, a
    weight_decay_exempt); a JobError for a pattern that matches none (a typo would decay everything silently)."""
    for pattern in patterns:
        if not any(pattern in v.path for v in variables):
            raise JobError(f"{key} = {patterns} names {pattern!r}, which is in no variable's path: use "
                           "parts of MobileNetV2's variable paths such as 'gamma', 'beta', 'depthwise' or 'bias'.")
    return [v for v in variables if any(pattern in v.path for pattern in patterns)]


def check_batch(cluster: Cluster, batch: int, key: str) -> None:
    """A JobError when the global batch `batch` (config key `key`) does not split over the cluster's replicas."""
    replicas = cluster.num_replicas
    if batch % replicas:
        raise JobError(f"{key} = {batch} does not split over {replicas} replicas: make it a multiple of {replicas}.")
