"""Optimisation: the learning-rate schedule, the optimizers, parameter groups and one loss scale over them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import tensorflow as tf


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak`, then cosine decay to zero at `total_steps`.

    The three numbers are variables, so a traced train step follows `set_length()` without re-tracing.
    """

    def __init__(self, peak: float, warmup_steps: int, total_steps: int):
        self.peak = tf.Variable(0.0, trainable=False, name="lr_peak")
        self.warmup_steps = tf.Variable(0.0, trainable=False, name="lr_warmup_steps")
        self.total_steps = tf.Variable(0.0, trainable=False, name="lr_total_steps")
        self.peak.assign(peak)
        self.set_length(warmup_steps, total_steps)

    def set_length(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps.assign(max(warmup_steps, 0))
        self.total_steps.assign(max(total_steps, 1))

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        peak, warmup, total = self.peak, self.warmup_steps, self.total_steps
        rising = peak * (step + 1.0) / tf.maximum(warmup, 1.0)
        progress = (step - warmup) / tf.maximum(total - warmup, 1.0)
        cosine = 0.5 * peak * (1.0 + tf.cos(math.pi * tf.clip_by_value(progress, 0.0, 1.0)))
        return tf.where(step < warmup, rising, cosine)

    def get_config(self):
        return {"peak": float(self.peak.numpy()), "warmup_steps": int(self.warmup_steps.numpy()),
                "total_steps": int(self.total_steps.numpy())}


def make_optimizer(name: str, schedule: WarmupCosine, weight_decay: float,
                   exempt: list | None = None) -> keras.optimizers.Optimizer:
    """AdamW, or SGD with Nesterov momentum 0.9 (weight decay applied decoupled in both, to every variable but
    those in `exempt`)."""
    if name == "sgd":
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    else:
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=weight_decay)
    if exempt:
        optimizer.exclude_from_weight_decay(var_list=exempt)
    return optimizer


@dataclass
class ParamGroup:
    """Variables trained by one optimizer (e.g. the backbone at a lower learning rate than the head)."""

    variables: list
    optimizer: keras.optimizers.Optimizer


class GroupedOptimizer(keras.optimizers.Optimizer):
    """Several parameter groups' optimizers as one, so that one LossScaleOptimizer wraps them all: one loss
    scale unscales every group's gradients, and a non-finite gradient anywhere skips the step for all."""

    def __init__(self, groups: list[ParamGroup], name: str = "grouped"):
        super().__init__(learning_rate=0.0, name=name)
        self._groups = tuple(groups)  # a tuple of plain objects: neither Keras nor TF tracks the model's variables
        for i, group in enumerate(groups):
            setattr(self, f"group{i}", group.optimizer)  # checkpointed with this optimizer

    def build(self, var_list) -> None:
        if len(var_list) != sum(len(g.variables) for g in self._groups):
            raise ValueError(f"{len(var_list)} variables for groups of {[len(g.variables) for g in self._groups]}")
        for group in self._groups:
            if not group.optimizer.built:
                group.optimizer.build(group.variables)
        super().build(var_list)

    @property
    def variables(self) -> list:
        return self._variables + [v for g in self._groups for v in g.optimizer.variables]

    @property
    def learning_rate(self):
        return self._groups[0].optimizer.learning_rate  # the first group's (what the training log shows)

    def apply(self, grads, trainable_variables=None) -> None:
        """Each group's optimizer applies its slice of `grads` (in the order of the groups' variables)."""
        grads, offset = list(grads), 0
        for group in self._groups:
            count = len(group.variables)
            group.optimizer.apply(grads[offset : offset + count], group.variables)
            offset += count
        self._iterations.assign_add(1)


def loss_scaled(groups: list[ParamGroup]) -> list[ParamGroup]:
    """Mixed precision: the groups under one LossScaleOptimizer (one group over all their variables).

    One scale for all: a loss scaled by one group's scale but unscaled by another's (or not at all) would
    multiply that group's updates by the ratio. Build it under the strategy's scope.
    """
    inner = groups[0].optimizer if len(groups) == 1 else GroupedOptimizer(groups)
    return [ParamGroup([v for g in groups for v in g.variables], keras.optimizers.LossScaleOptimizer(inner))]


def scale_loss(groups: list[ParamGroup], loss: tf.Tensor) -> tf.Tensor:
    """The loss times the loss scale, when the (then only) group's optimizer is a LossScaleOptimizer."""
    optimizer = groups[0].optimizer
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.scale_loss(loss)
    return loss


def current_lr(optimizer: keras.optimizers.Optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return float(keras.ops.convert_to_numpy(inner.learning_rate))
