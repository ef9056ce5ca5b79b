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

import mmap
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

NUM_ROTATIONS = 4
SEED_STRIDE = 1_000_003  # (seed, epoch) → one stateless-RNG key component


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


def augment_batch(images: tf.Tensor, flips: tf.Tensor, offsets: tf.Tensor, padding: int) -> tf.Tensor:
    """Random horizontal flip, then a random crop of the reflect-padded image; uint8 in, uint8 out.

    `flips` [B] bool, `offsets` [B, 2] int32 in [0, 2 * padding]. Neither operation reveals orientation.
    """
    x = tf.where(flips[:, None, None, None], tf.reverse(images, axis=[2]), images)
    if not padding:
        return x
    height, width = images.shape[1], images.shape[2]
    x = tf.pad(x, [[0, 0], [padding, padding], [padding, padding], [0, 0]], mode="REFLECT")
    rows = offsets[:, :1] + tf.range(height)[None, :]
    cols = offsets[:, 1:] + tf.range(width)[None, :]
    x = tf.gather(x, rows, axis=1, batch_dims=1)
    return tf.gather(x, cols, axis=2, batch_dims=1)


def draw_augmentation(seed: int, epoch: int, step: tf.Tensor, count: int, padding: int):
    """Flips and crop offsets for one global batch, a pure function of (seed, epoch, step)."""
    base = tf.cast(seed * SEED_STRIDE + epoch, tf.int64)
    step = tf.cast(step, tf.int64)
    flips = tf.random.stateless_uniform([count], seed=tf.stack([base, 2 * step])) < 0.5
    offsets = tf.random.stateless_uniform(
        [count, 2], seed=tf.stack([base, 2 * step + 1]), minval=0, maxval=2 * padding + 1, dtype=tf.int32
    )
    return flips, offsets


def rotate_four_tf(images: tf.Tensor) -> tf.Tensor:
    """[B, H, W, C] → [4B, H, W, C], block k = tf.image.rot90(images, k)."""
    return tf.concat([tf.image.rot90(images, k) for k in range(NUM_ROTATIONS)], axis=0)


class ImageStore:
    """A uint8 image array held once in host memory as a TF resource, for in-graph batch gathers.

    The input pipeline then runs without Python (no GIL, no numpy_function) and can be torn down at any
    step. The variable is read by handle, so tf.data functions do not copy it. A memory-mapped source's
    pages are released afterwards: the images are resident once, in TF's copy.
    """

    def __init__(self, images: np.ndarray):
        with tf.device("/cpu:0"):
            self.variable = tf.Variable(np.asarray(images), trainable=False, name="images")
        _release_pages(images)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.variable.shape)


def _release_pages(array: np.ndarray) -> None:
    """Tell the kernel a memory-mapped array's pages are not needed now (they are re-read on access)."""
    mapping = getattr(array, "_mmap", None) or getattr(getattr(array, "base", None), "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise"):
        mapping.madvise(mmap.MADV_DONTNEED)


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
    images: ImageStore | np.ndarray,
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
    """Per-replica training batches {images uint8, labels, weights, rotations} for steps start_step..end.

    With `rotations=True` (the pretext task), every image of a replica batch appears in all four
    rotations in that batch (block k rotated by k*90°), `rotations` holds the angle index and `labels`
    the class label, for an online probe only. Augmentation draws are made for the whole global batch,
    so they do not depend on how it is sharded.
    """
    store = images if isinstance(images, ImageStore) else ImageStore(images)
    global_batch = plan.indices.shape[1]
    replicas = sharding.replicas_per_pipeline
    if global_batch % (sharding.num_pipelines * replicas):
        raise ValueError(f"global batch {global_batch} does not split over {sharding} replicas")
    part = sharding.slice(global_batch)
    indices = tf.constant(plan.indices[:, part])
    weights = tf.constant(plan.weights[:, part])
    label_table = tf.constant(np.asarray(labels, np.int32))
    size = store.shape[1]

    def per_replica(t: tf.Tensor) -> tf.Tensor:
        return tf.reshape(t, [replicas, -1, *t.shape[1:]])

    def load(step):
        flips, offsets = draw_augmentation(seed, epoch, step, global_batch, padding)
        index = indices[step]
        x = augment_batch(tf.gather(store.variable, index), flips[part], offsets[part], padding)
        x, y, w = per_replica(x), per_replica(tf.gather(label_table, index)), per_replica(weights[step])
        if rotations:
            x = tf.stack([rotate_four_tf(x[r]) for r in range(replicas)])
            y, w = tf.tile(y, [1, NUM_ROTATIONS]), tf.tile(w, [1, NUM_ROTATIONS])
            angles = tf.repeat(tf.range(NUM_ROTATIONS, dtype=tf.int32), tf.shape(x)[1] // NUM_ROTATIONS)
            r = tf.tile(angles[None], [replicas, 1])
        else:
            r = tf.zeros_like(y)
        x = tf.ensure_shape(x, (replicas, None, size, size, 3))
        return {"images": x, "labels": y, "weights": w, "rotations": r}

    steps = tf.data.Dataset.range(start_step, plan.steps)
    dataset = steps.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.unbatch() if replicas > 1 else dataset.map(lambda b: {k: v[0] for k, v in b.items()})
    return dataset.prefetch(prefetch)


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, rotations: bool = False):
    """Deterministic evaluation batches in file order (numpy), all four rotations of each image if asked."""
    for begin in range(0, len(labels), batch_size):
        x, y = np.asarray(images[begin : begin + batch_size]), labels[begin : begin + batch_size]
        if rotations:
            x, angles = rotate_four(x)
            yield x, np.tile(y, NUM_ROTATIONS), angles
        else:
            yield x, y, np.zeros_like(y)
