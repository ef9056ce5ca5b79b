"""tf.data pipelines over decoded uint8 arrays: the rotation pretext set, labelled sets, evaluation sets.

What makes them fast and resumable:
- a sample never costs a JPEG decode: images are decoded once, held in host memory and gathered a whole
  batch at a time, in-graph (no Python, no GIL, but for each epoch's shuffle, drawn once on the host), so the
  pipeline can be torn down at any step (for a small host, `EncodedStore` holds the JPEG bytes instead and
  decodes each gathered batch in-graph: the same pixels);
- the images are held once, as decoded (uint8 RGB, `ImageStore`); a gathered batch is packed into 32-bit
  RGBX words, so a flip, crop or rotation then moves one int32 per pixel instead of three separate bytes,
  which makes TF's CPU kernels ~4x faster; they stay uint8 until the model, and the train step drops the
  fourth byte on its device (`model_pixels`);
- the crop, flip and four rotations are batched index operations on the gathered batch, and the pretext's colour
  shuffle (`shuffle_colours`) a few bit operations on its packed pixels;
- the order of an epoch and every random draw are functions of (seed, epoch, step), so a restarted
  process that skips the steps already done sees exactly the batches it would have seen;
- one dataset holds all of a fit's epochs (`train_epochs`), so one iterator lives through the fit;
- each worker takes its own slice of every global batch: with N workers each image is seen once per epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from job.data import EncodedImages, release_pages
from job.decode import decode_stored
from models.heads import NUM_ROTATIONS

SEED_STRIDE = 1_000_003  # (seed, epoch) → one stateless-RNG key component
SCALE_STREAM = 1 << 48  # added to that key for the crop scales: a stream no (seed, epoch) reaches
COLOUR_STREAM = 2 << 48  # the same for the colour orders
# The six orders of an image's R, G and B channels (output channel c shows input channel order[c]); order 0 is the
# image's own. The pretext's second task predicts which order a sample is shown in (pretext.colour_order_weight).
COLOUR_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
RGBX = 4  # bytes per pixel in the training batches: R, G, B and one zero byte
STORE_CHUNK = 512  # images copied into the ImageStore at once (6 MB at 64 px: 4,096 cost 128 MB more peak RSS)
ENCODED_STORE_CHUNK = 4096  # encoded images copied into the EncodedStore at once (~10 MB of JPEGs at 64 px)
PARALLEL_DECODES = 64  # images of a gathered batch the EncodedStore decodes at once (tf.map_fn)


@dataclass(frozen=True)
class BatchPlan:
    """The global batches of one epoch: example indices and weights (0 marks padding in the last batch)."""

    indices: np.ndarray  # int64 [steps, global_batch]
    weights: np.ndarray  # float32 [steps, global_batch]

    @property
    def steps(self) -> int:
        return len(self.indices)


def one_pass_steps(num_examples: int, global_batch: int) -> int:
    """Batches in one pass over the examples, the last one in part."""
    return -(-num_examples // global_batch)


def plan_epoch(num_examples: int, global_batch: int, seed: int, epoch: int, steps: int = 0) -> BatchPlan:
    """Shuffle the examples with (seed, epoch) and cut them into global batches.

    With `steps=0` an epoch is one pass: the last batch is padded with weight-0 repeats, so every example
    is used exactly once; so is it when the examples fill exactly `steps` batches, the last one in part. With
    any other `steps` the epoch has that many full batches of a fresh shuffle, wrapping around as needed: a
    larger set then gives each epoch a different subset, and an epoch costs the same whatever the set's size.
    """
    if num_examples <= 0:
        raise ValueError("cannot plan an epoch over zero examples")
    rng = np.random.default_rng([seed, epoch])
    if steps and steps != one_pass_steps(num_examples, global_batch):
        repeats = -(-steps * global_batch // num_examples)
        order = np.concatenate([rng.permutation(num_examples) for _ in range(repeats)])[: steps * global_batch]
        weights = np.ones(order.shape, np.float32)
    else:
        order = rng.permutation(num_examples)
        steps = one_pass_steps(num_examples, global_batch)
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


def augment_batch(images: tf.Tensor, flips: tf.Tensor, offsets: tf.Tensor, padding: int,
                  sides: tf.Tensor | None = None) -> tf.Tensor:
    """Random horizontal flip, then a random crop of the reflect-padded image; any dtype, shape kept.

    `images` [B, H, W, ...] (H = W), `flips` [B] bool, `offsets` [B, 2] int32: the crop's top-left corner in the
    padded image, in [0, 2 * padding + H - side]. `sides` [B] int32: each crop's side in pixels, scaled back to
    H by nearest neighbour (None: H, a plain crop). Neither operation reveals orientation.
    """
    rows_t, cols = _crop_rows_transposed(images, flips, offsets, padding, sides)
    return tf.transpose(tf.gather(rows_t, cols, axis=1, batch_dims=1), _swap_axes(images))


def augment_and_rotate(images: tf.Tensor, flips: tf.Tensor, offsets: tf.Tensor, padding: int,
                       sides: tf.Tensor | None = None) -> tf.Tensor:
    """`augment_batch`, then all four rotations: [B, H, W, ...] → [4B, H, W, ...], block k rotated by k*90°.

    Block k equals tf.image.rot90(augment_batch(...), k), for fewer element-wise passes than rotating the
    augmented batch: the 90° block is gathered straight from the transposed crop.
    """
    rows_t, cols = _crop_rows_transposed(images, flips, offsets, padding, sides)
    augmented_t = tf.gather(rows_t, cols, axis=1, batch_dims=1)
    rotated_90 = tf.gather(rows_t, tf.reverse(cols, [1]), axis=1, batch_dims=1)
    augmented = tf.transpose(augmented_t, _swap_axes(images))
    return tf.concat([augmented, rotated_90, tf.reverse(augmented, [1, 2]), tf.reverse(augmented_t, [2])], 0)


def _crop_rows_transposed(images, flips, offsets, padding, sides) -> tuple[tf.Tensor, tf.Tensor]:
    """The crop's rows, gathered whole and transposed, and the crop's (mirrored) columns [B, W].

    The columns are then gathered as rows of the transpose: a whole-row gather is a memcpy, a per-element
    column gather ~10x slower in TF's CPU kernels.
    """
    rows, cols = _crop_indices(images, flips, offsets, padding, sides)
    return tf.transpose(tf.gather(images, rows, axis=1, batch_dims=1), _swap_axes(images)), cols


def _crop_indices(images, flips, offsets, padding, sides):
    """Source rows [B, H] and columns [B, W] of each output pixel: crop offset and scale, reflection, mirror.

    Output pixel i samples the crop at the centre of its cell, floor((i + 1/2) * side / H), in integers; a crop
    as large as the image samples every pixel once.
    """
    height, width = images.shape[1], images.shape[2]
    if sides is None:
        rows, cols = tf.range(height)[None, :], tf.range(width)[None, :]
    else:
        rows = (2 * tf.range(height)[None, :] + 1) * sides[:, None] // (2 * height)
        cols = (2 * tf.range(width)[None, :] + 1) * sides[:, None] // (2 * width)
    rows = _reflect(offsets[:, :1] - padding + rows, height)
    cols = _reflect(offsets[:, 1:] - padding + cols, width)
    return rows, tf.where(flips[:, None], width - 1 - cols, cols)


def _swap_axes(images) -> list[int]:
    return [0, 2, 1, *range(3, images.shape.rank)]


def _reflect(index: tf.Tensor, size: int) -> tf.Tensor:
    """Map indices in [-size+1, 2*size-2] into [0, size) as numpy's / tf.pad's "reflect" mode does."""
    return (size - 1) - tf.abs((size - 1) - tf.abs(index))


def draw_augmentation(seed: int, epoch: int | tf.Tensor, step: tf.Tensor, count: int, padding: int,
                      size: int = 0, min_area: float = 1.0):
    """Flips, crop offsets and crop sides for one global batch, a pure function of (seed, epoch, step).

    With `min_area` < 1 each crop covers a uniform draw from [min_area, 1] of the `size`-pixel image's area
    (square, scaled back: `augment_batch`); at 1 the sides are None and the draws are those of a plain crop.
    """
    base = tf.cast(seed * SEED_STRIDE + epoch, tf.int64)
    step = tf.cast(step, tf.int64)
    flips = tf.random.stateless_uniform([count], seed=tf.stack([base, 2 * step])) < 0.5
    if min_area >= 1.0:
        offsets = tf.random.stateless_uniform(
            [count, 2], seed=tf.stack([base, 2 * step + 1]), minval=0, maxval=2 * padding + 1, dtype=tf.int32
        )
        return flips, offsets, None
    if size <= 0:
        raise ValueError(f"scaled crops (min_area {min_area}) need the image size, not {size}")
    area = tf.random.stateless_uniform([count], seed=tf.stack([base + SCALE_STREAM, step]), minval=min_area)
    sides = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area) * size), tf.int32), 1, size)
    corner = tf.random.stateless_uniform([count, 2], seed=tf.stack([base, 2 * step + 1]))
    spans = tf.cast(2 * padding + size - sides + 1, tf.float32)[:, None]
    offsets = tf.minimum(tf.cast(corner * spans, tf.int32), tf.cast(spans, tf.int32) - 1)
    return flips, offsets, sides


def draw_colour_orders(seed: int, epoch: int | tf.Tensor, step: tf.Tensor, count: int,
                       shuffled_fraction: float) -> tf.Tensor:
    """Colour orders (indices into COLOUR_ORDERS) [count, NUM_ROTATIONS] for one global batch in four rotations,
    a pure function of (seed, epoch, step): each sample's own order with probability 1 - `shuffled_fraction`, else
    one of the other five, uniformly."""
    base = tf.cast(seed * SEED_STRIDE + epoch, tf.int64) + COLOUR_STREAM
    draws = tf.random.stateless_uniform([count, NUM_ROTATIONS, 2], seed=tf.stack([base, tf.cast(step, tf.int64)]))
    others = len(COLOUR_ORDERS) - 1
    other = 1 + tf.minimum(tf.cast(draws[..., 1] * others, tf.int32), others - 1)
    return tf.where(draws[..., 0] < shuffled_fraction, other, tf.zeros_like(other))


def shuffle_colours(words: tf.Tensor, orders: tf.Tensor) -> tf.Tensor:
    """Packed RGBX pixels [N, H, W] int32 (`pack_rgbx`) with sample n's channels put in COLOUR_ORDERS[orders[n]]:
    output channel c = input channel order[c], the fourth byte still zero. Bit operations on whole words: a
    per-byte gather would be ~10x slower in TF's CPU kernels."""
    # input channel k moves to byte inverse[k] of the word
    shifts = tf.constant([[8 * order.index(k) for k in range(3)] for order in COLOUR_ORDERS], tf.int32)
    shift = tf.gather(shifts, orders)[:, None, None, :]  # [N, 1, 1, 3]
    shuffled = tf.zeros_like(words)
    for k in range(3):
        channel = tf.bitwise.bitwise_and(tf.bitwise.right_shift(words, 8 * k), 0xFF)
        shuffled = tf.bitwise.bitwise_or(shuffled, tf.bitwise.left_shift(channel, shift[..., k]))
    return shuffled


def pack_rgbx(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] → int32 [N, H, W]: each pixel's R, G, B and a zero byte in one 32-bit word."""
    rgbx = np.zeros((*images.shape[:-1], RGBX), np.uint8)
    rgbx[..., :3] = images
    return rgbx.view(np.int32)[..., 0]


def model_pixels(images: tf.Tensor) -> tf.Tensor:
    """The train step's input conversion, on its device: uint8 RGBX (or RGB) [..., C] → float32 RGB."""
    return tf.cast(images[..., :3], tf.float32)


class ImageStore:
    """The training images held once in host memory as a TF resource, uint8 [N, H, W, 3] as decoded.

    Batches are gathered from it in-graph (`gather`, packed to RGBX there), so the input pipeline runs
    without Python and can be torn down at any step; tf.data functions read the variable by handle and do
    not copy it. It is filled a chunk at a time from a (memory-mapped) uint8 array whose pages are released
    as it goes, so the images are resident once, at 3 bytes a pixel.
    """

    def __init__(self, images: np.ndarray, chunk: int = STORE_CHUNK):
        count, height, width, channels = images.shape
        with tf.device("/cpu:0"):
            self.variable = tf.Variable(
                lambda: tf.zeros([count, height, width, channels], tf.uint8), trainable=False, name="images"
            )
            for begin in range(0, count, chunk):
                end = min(begin + chunk, count)
                # A scatter writes in place; a slice assignment would copy the whole variable each time.
                rows = tf.IndexedSlices(tf.constant(images[begin:end]), tf.range(begin, end))
                self.variable.scatter_update(rows)
                release_pages(images)

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, H, W): images, rows, columns."""
        return tuple(self.variable.shape[:3])

    def gather(self, index: tf.Tensor) -> tf.Tensor:
        """The images at `index`, packed: int32 [B, H, W], one RGBX word a pixel (see `pack_rgbx`)."""
        return _pack(tf.gather(self.variable, index))


class EncodedStore:
    """The training images held once in host memory as encoded bytes (a string TF resource), decoded in-graph.

    The small-host alternative to `ImageStore` (`data.store = "encoded"`): a 64 px Tiny ImageNet JPEG is ~2-3 KB
    where its pixels are 12 KB. `gather` decodes the batch's images (`job.decode.decode_stored`: JPEGs as
    PIL decodes them, PNGs losslessly) and packs them as `ImageStore.gather` does: the same pixels, so the same
    batches, at the cost of a decode per image and step.
    """

    def __init__(self, encoded: EncodedImages, size: int, chunk: int = ENCODED_STORE_CHUNK):
        self.size = size
        count = len(encoded)
        with tf.device("/cpu:0"):
            self.variable = tf.Variable(lambda: tf.fill([count], ""), trainable=False, name="encoded_images")
            for begin in range(0, count, chunk):
                end = min(begin + chunk, count)
                data = np.array([encoded[i] for i in range(begin, end)], object)
                self.variable.scatter_update(tf.IndexedSlices(tf.constant(data), tf.range(begin, end)))
                release_pages(encoded.data)

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, H, W): images, rows, columns."""
        return (int(self.variable.shape[0]), self.size, self.size)

    def gather(self, index: tf.Tensor) -> tf.Tensor:
        """The images at `index`, decoded and packed: int32 [B, H, W], as `ImageStore.gather` gives them."""
        pixels = tf.map_fn(
            lambda data: decode_stored(data, self.size), tf.gather(self.variable, index),
            fn_output_signature=tf.TensorSpec([self.size, self.size, 3], tf.uint8),
            parallel_iterations=PARALLEL_DECODES,
        )
        return _pack(pixels)


def _pack(pixels: tf.Tensor) -> tf.Tensor:
    """uint8 [B, H, W, 3] → int32 [B, H, W], one RGBX word a pixel (the in-graph `pack_rgbx`)."""
    return tf.bitcast(tf.pad(pixels, [[0, 0], [0, 0], [0, 0], [0, RGBX - 3]]), tf.int32)


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
    images: ImageStore | EncodedStore | np.ndarray,
    labels: np.ndarray,
    plan: BatchPlan,
    *,
    seed: int,
    epoch: int,
    start_step: int = 0,
    **options,
) -> tf.data.Dataset:
    """One epoch of `train_epochs`, planned by `plan`: its steps start_step..end."""
    return train_epochs(images, labels, lambda _: plan, range(epoch, epoch + 1), seed=seed, start_step=start_step,
                        **options)


def train_epochs(
    images: ImageStore | EncodedStore | np.ndarray,
    labels: np.ndarray,
    plans: Callable[[int], BatchPlan],
    epochs: range,
    *,
    seed: int,
    start_step: int = 0,
    padding: int = 0,
    min_crop_area: float = 1.0,
    rotations: bool = False,
    shuffled_colours: float = 0.0,
    sharding: Sharding = Sharding(),
    prefetch: int = 4,
) -> tf.data.Dataset:
    """Per-replica training batches {images uint8 RGBX, labels, weights, rotations} of `epochs`, one after the
    other, the first from its step `start_step`; epoch e's batches are planned by `plans(e)`.

    One dataset for a whole fit, so one iterator: the pipeline prefetches the next epoch while the loop evaluates,
    and no iterator is torn down at an epoch's end (with one iterator an epoch, some epochs of a CPU run started
    ~40 s late, in the old iterator's teardown: docs/throughput.md).
    Each epoch's plan is drawn on the host (`plans`, through `tf.numpy_function`) when the pipeline reaches it:
    the only Python in the pipeline, once an epoch.

    With `rotations=True` (the pretext task), every image of a replica batch appears in all four
    rotations in that batch (block k rotated by k*90°), `rotations` holds the angle index and `labels`
    the class label, for an online probe only. Augmentation (a flip, a crop of the image padded by `padding`,
    scaled from at least `min_crop_area` of its area: `draw_augmentation`) is drawn for the whole global batch,
    so it does not depend on how the batch is sharded. With `shuffled_colours` > 0 (rotations only), that share of
    the samples is shown with its R, G and B channels in another order (`draw_colour_orders`, `shuffle_colours`),
    and `colour_orders` holds each sample's order.
    """
    if shuffled_colours and not rotations:
        raise ValueError("shuffled colours are a pretext task: they need rotations=True")
    store = images if isinstance(images, (ImageStore, EncodedStore)) else ImageStore(images)
    steps, global_batch = plans(epochs.start).indices.shape if epochs else (0, 0)
    replicas = sharding.replicas_per_pipeline
    if global_batch % (sharding.num_pipelines * replicas):
        raise ValueError(f"global batch {global_batch} does not split over {sharding} replicas")
    part = sharding.slice(global_batch)
    label_table = tf.constant(np.asarray(labels, np.int32))
    size = store.shape[1]

    def planned(epoch: np.int64) -> tuple[np.ndarray, np.ndarray]:
        plan = plans(int(epoch))
        if plan.indices.shape != (steps, global_batch):
            raise ValueError(f"epoch {int(epoch)} is planned as {plan.indices.shape} batches, the first as "
                             f"{(steps, global_batch)}")
        return plan.indices[:, part].astype(np.int64), plan.weights[:, part].astype(np.float32)

    def epoch_rows(epoch: tf.Tensor) -> tf.data.Dataset:
        """(epoch, step, this pipeline's indices and weights) for each remaining step of `epoch`."""
        indices, weights = tf.numpy_function(planned, [epoch], (tf.int64, tf.float32), stateful=False)
        begin = tf.where(epoch == epochs.start, tf.constant(start_step, tf.int64), tf.constant(0, tf.int64))
        step = tf.range(begin, steps, dtype=tf.int64)
        return tf.data.Dataset.from_tensor_slices(
            (tf.fill(tf.shape(step), epoch), step, tf.gather(indices, step), tf.gather(weights, step))
        )

    def replica_batch(images, labels, weights, flips, offsets, sides=None, orders=None) -> dict[str, tf.Tensor]:
        extra = {}
        if rotations:
            images = augment_and_rotate(images, flips, offsets, padding, sides)
            labels, weights = tf.tile(labels, [NUM_ROTATIONS]), tf.tile(weights, [NUM_ROTATIONS])
            angles = tf.repeat(tf.range(NUM_ROTATIONS, dtype=tf.int32), tf.shape(images)[0] // NUM_ROTATIONS)
            if orders is not None:  # [images, rotation] → the samples' order: rotation blocks
                extra["colour_orders"] = tf.reshape(tf.transpose(orders), [-1])
                images = shuffle_colours(images, extra["colour_orders"])
        else:
            images, angles = augment_batch(images, flips, offsets, padding, sides), tf.zeros_like(labels)
        images = tf.ensure_shape(tf.bitcast(images, tf.uint8), (None, size, size, RGBX))
        return {"images": images, "labels": labels, "weights": weights, "rotations": angles, **extra}

    def load(epoch, step, index, weights):
        flips, offsets, sides = draw_augmentation(seed, epoch, step, global_batch, padding, size, min_crop_area)
        index = tf.ensure_shape(index, (part.stop - part.start,))
        mine = {"images": store.gather(index), "labels": tf.gather(label_table, index), "weights": weights,
                "flips": flips[part], "offsets": offsets[part]}
        if sides is not None:
            mine["sides"] = sides[part]
        if shuffled_colours:
            mine["orders"] = draw_colour_orders(seed, epoch, step, global_batch, shuffled_colours)[part]
        if replicas == 1:
            return replica_batch(**mine)
        split = {name: tf.split(t, replicas) for name, t in mine.items()}
        parts = [replica_batch(**{name: pieces[r] for name, pieces in split.items()}) for r in range(replicas)]
        return tf.nest.map_structure(lambda *t: tf.stack(t), *parts)

    rows = tf.data.Dataset.range(epochs.start, epochs.stop).flat_map(epoch_rows)
    dataset = rows.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if replicas > 1:
        dataset = dataset.unbatch()
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
