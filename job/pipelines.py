"""tf.data pipelines over decoded uint8 arrays: the rotation pretext set, labelled sets, evaluation sets.

What makes them fast and resumable:
- images stay uint8 until the model (its first layer rescales), and are gathered a whole batch at a time
  from a (memory-mapped) array, so a sample costs a memcpy, not a JPEG decode;
- augmentation and the four rotations are batched numpy ops on the gathered batch;
- the order of an epoch and every random draw are functions of (seed, epoch, step), so a restarted
  process that skips the steps already done sees exactly the batches it would have seen;
- each worker takes its own slice of every global batch: with N workers each image is seen once per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

NUM_ROTATIONS = 4


@dataclass(frozen=True)
class BatchPlan:
    """The global batches of one epoch: example indices and weights (0 marks padding in the last batch)."""

    indices: np.ndarray  # int64 [steps, global_batch]
    weights: np.ndarray  # float32 [steps, global_batch]

    @property
    def steps(self) -> int:
        return len(self.indices)


def plan_epoch(num_examples: int, global_batch: int, seed: int, epoch: int, steps: int = 0) -> BatchPlan:
    """Shuffle the examples with (seed, epoch) and cut them into global batches.

    With `steps=0` an epoch is one pass: the last batch is padded with weight-0 repeats, so every example
    is used exactly once. With `steps>0` the epoch has that many full batches, wrapping around as needed.
    """
    if num_examples <= 0:
        raise ValueError("cannot plan an epoch over zero examples")
    rng = np.random.default_rng([seed, epoch])
    if steps:
        repeats = -(-steps * global_batch // num_examples)
        order = np.concatenate([rng.permutation(num_examples) for _ in range(repeats)])[: steps * global_batch]
        weights = np.ones(order.shape, np.float32)
    else:
        order = rng.permutation(num_examples)
        steps = -(-num_examples // global_batch)
        pad = steps * global_batch - num_examples
        weights = np.concatenate([np.ones(num_examples, np.float32), np.zeros(pad, np.float32)])
        order = np.concatenate([order, np.resize(order, pad)])
    return BatchPlan(order.reshape(steps, global_batch), weights.reshape(steps, global_batch))


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset with `fraction` of each class (at least one example per class)."""
    if fraction >= 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, int(round(fraction * len(members))))
        chosen.append(rng.choice(members, count, replace=False))
    return np.sort(np.concatenate(chosen))


def random_subset(num_examples: int, count: int, seed: int) -> np.ndarray:
    """Sorted indices of `count` examples drawn without replacement (all of them when count is 0)."""
    if count <= 0 or count >= num_examples:
        return np.arange(num_examples)
    return np.sort(np.random.default_rng(seed).choice(num_examples, count, replace=False))


def rotate_four(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[B, H, W, C] → [4B, H, W, C] with block k rotated by k*90° counter-clockwise (= tf.image.rot90(x, k))."""
    rotated = [np.rot90(images, k, axes=(1, 2)) for k in range(NUM_ROTATIONS)]
    labels = np.repeat(np.arange(NUM_ROTATIONS, dtype=np.int32), len(images))
    return np.concatenate(rotated), labels


@dataclass(frozen=True)
class Augmentation:
    """Random draws for a batch: horizontal flips and crop offsets (into the padded image)."""

    flips: np.ndarray  # bool [B]
    offsets: np.ndarray  # int [B, 2]

    @classmethod
    def draw(cls, rng: np.random.Generator, count: int, padding: int) -> Augmentation:
        return cls(rng.random(count) < 0.5, rng.integers(0, 2 * padding + 1, size=(count, 2)))

    def __getitem__(self, part: slice) -> Augmentation:
        return Augmentation(self.flips[part], self.offsets[part])


def augment(images: np.ndarray, draws: Augmentation, padding: int) -> np.ndarray:
    """Random crop after reflect padding, and random horizontal flip: neither reveals orientation."""
    count, height, width, _ = images.shape
    flips, offsets = draws.flips, draws.offsets
    out = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
    if padding:
        padded = np.pad(out, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode="reflect")
        out = np.stack([padded[i, y : y + height, x : x + width] for i, (y, x) in enumerate(offsets)])
    return np.ascontiguousarray(out)


@dataclass(frozen=True)
class Sharding:
    """Which slice of each global batch this input pipeline produces, and into how many replica batches."""

    pipeline_id: int = 0
    num_pipelines: int = 1
    replicas_per_pipeline: int = 1

    @classmethod
    def from_input_context(cls, context: tf.distribute.InputContext | None) -> Sharding:
        if context is None:
            return cls()
        local = context.num_replicas_in_sync // context.num_input_pipelines
        return cls(context.input_pipeline_id, context.num_input_pipelines, local)

    def slice(self, global_batch: int) -> slice:
        size = global_batch // self.num_pipelines
        return slice(self.pipeline_id * size, (self.pipeline_id + 1) * size)


def train_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    plan: BatchPlan,
    *,
    seed: int,
    epoch: int,
    start_step: int = 0,
    padding: int = 0,
    rotations: bool = False,
    sharding: Sharding = Sharding(),
    prefetch: int = 4,
) -> tf.data.Dataset:
    """Per-replica training batches {images uint8, labels, weights[, rotations]} for steps start_step..end.

    With `rotations=True` (the pretext task), every image of a replica batch appears in all four
    rotations in that batch, `rotations` holds the angle index and `labels` the (unused by the
    backbone) class label for an online probe.
    """
    global_batch = plan.indices.shape[1]
    if global_batch % (sharding.num_pipelines * sharding.replicas_per_pipeline):
        raise ValueError(f"global batch {global_batch} does not split over {sharding} replicas")
    part = sharding.slice(global_batch)
    replicas = sharding.replicas_per_pipeline
    size = images.shape[1]

    def make_batch(step: np.int64):
        # Draws are made for the whole global batch, so they do not depend on how it is sharded.
        rng = np.random.default_rng([seed, epoch, int(step)])
        draws = Augmentation.draw(rng, global_batch, padding)[part]
        flips_and_crops = augment(images[plan.indices[step, part]], draws, padding)
        batch_labels = labels[plan.indices[step, part]].astype(np.int32)
        weights = plan.weights[step, part]
        if rotations:
            chunks = [_rotated_chunk(x, y, w) for x, y, w in _split(replicas, flips_and_crops, batch_labels, weights)]
            return tuple(np.stack(parts) for parts in zip(*chunks))
        rot = np.zeros_like(batch_labels)
        return tuple(
            np.stack(np.split(a, replicas)) for a in (flips_and_crops, batch_labels, weights, rot)
        )

    def load(step):
        x, y, w, r = tf.numpy_function(make_batch, [step], (tf.uint8, tf.int32, tf.float32, tf.int32))
        per_replica = global_batch // (sharding.num_pipelines * replicas) * (NUM_ROTATIONS if rotations else 1)
        x = tf.ensure_shape(x, (replicas, per_replica, size, size, 3))
        y, w, r = (tf.ensure_shape(t, (replicas, per_replica)) for t in (y, w, r))
        return {"images": x, "labels": y, "weights": w, "rotations": r}

    steps = tf.data.Dataset.range(start_step, plan.steps)
    dataset = steps.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.unbatch() if replicas > 1 else dataset.map(lambda b: {k: v[0] for k, v in b.items()})
    return dataset.prefetch(prefetch)


def _split(parts: int, *arrays: np.ndarray):
    return zip(*(np.split(a, parts) for a in arrays))


def _rotated_chunk(images: np.ndarray, labels: np.ndarray, weights: np.ndarray):
    rotated, angles = rotate_four(images)
    return rotated, np.tile(labels, NUM_ROTATIONS), np.tile(weights, NUM_ROTATIONS), angles


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, rotations: bool = False):
    """Deterministic evaluation batches in file order (numpy), all four rotations of each image if asked."""
    for begin in range(0, len(labels), batch_size):
        x, y = np.asarray(images[begin : begin + batch_size]), labels[begin : begin + batch_size]
        if rotations:
            x, angles = rotate_four(x)
            yield x, np.tile(y, NUM_ROTATIONS), angles
        else:
            yield x, y, np.zeros_like(y)
