"""Tests for job.pipelines: epoch plans, subsets, augmentation, rotations, resumable and sharded tf.data."""

from __future__ import annotations

import itertools
import random

import keras
import numpy as np
import pytest
import tensorflow as tf

from job.pipelines import (
    COLOUR_ORDERS,
    NUM_ROTATIONS,
    RGBX,
    BatchPlan,
    ImageStore,
    Sharding,
    augment_and_rotate,
    augment_batch,
    draw_augmentation,
    eval_batches,
    model_pixels,
    pack_rgbx,
    plan_epoch,
    random_subset,
    rotate_four,
    shuffle_colours,
    stratified_subset,
    train_dataset,
    train_epochs,
)

N, SIZE = 22, 8


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """N distinct uint8 images; image i has i in its first pixel so indices can be read back."""
    rng = np.random.default_rng(123)
    out = rng.integers(0, 256, size=(N, SIZE, SIZE, 3), dtype=np.uint8)
    out[:, 0, 0, 0] = np.arange(N)
    return out


def collect(dataset: tf.data.Dataset) -> list[dict[str, np.ndarray]]:
    """The dataset's elements, images checked to be uint8 RGBX with a zero fourth byte and returned as RGB."""
    elements = list(dataset.as_numpy_iterator())
    for element in elements:
        x = element["images"]
        assert x.dtype == np.uint8 and x.shape[-1] == RGBX and not x[..., 3].any()
        element["images"] = x[..., :3]
    return elements


def real_indices(batches: list[dict[str, np.ndarray]]) -> list[int]:
    """Example indices (labels = np.arange(N)) of the weight-1 samples, over all batches."""
    return [int(i) for b in batches for i, w in zip(b["labels"], b["weights"], strict=True) if w == 1]


# -- rotations -------------------------------------------------------------------------------------
def test_rotate_four_matches_tf_rot90():
    x = np.random.default_rng(0).integers(0, 256, size=(3, 5, 5, 2), dtype=np.uint8)
    rotated, labels = rotate_four(x)
    assert rotated.shape == (12, 5, 5, 2) and rotated.dtype == np.uint8
    assert labels.dtype == np.int32
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for k in range(NUM_ROTATIONS):
        np.testing.assert_array_equal(rotated[3 * k : 3 * k + 3], tf.image.rot90(x, k).numpy())
    np.testing.assert_array_equal(rotated[:3], x)
    # 90° counter-clockwise: the top row becomes the left column, read bottom to top
    np.testing.assert_array_equal(rotated[3][:, 0], x[0][0, ::-1])


# -- epoch plans -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("num", "batch"), [(22, 8), (24, 8), (5, 4), (7, 1), (3, 3)])
def test_plan_one_pass_uses_every_example_once(num, batch):
    plan = plan_epoch(num, batch, seed=1, epoch=0)
    steps = -(-num // batch)
    assert plan.steps == steps
    assert plan.indices.shape == plan.weights.shape == (steps, batch)
    assert plan.indices.dtype.kind == "i" and plan.weights.dtype == np.float32
    flat, weights = plan.indices.ravel(), plan.weights.ravel()
    assert sorted(flat[weights == 1].tolist()) == list(range(num))
    assert set(weights.tolist()) <= {0.0, 1.0}
    assert int((weights == 0).sum()) == steps * batch - num
    assert np.all(weights[:num] == 1) and np.all(weights[num:] == 0)  # padding only at the end
    assert flat.min() >= 0 and flat.max() < num


_RESEEDS = itertools.count(1000)


def move_global_random_state() -> None:
    """What happens between two plans in one process and not in a restarted one: the job reseeds the global
    generators (keras.utils.set_random_seed before building each model; a new seed each time here, so that no
    two calls leave them in the same state) and other code draws from them."""
    keras.utils.set_random_seed(next(_RESEEDS))
    np.random.random(5)
    random.random()
    tf.random.uniform([3])


def test_plan_is_a_function_of_seed_and_epoch_alone():
    """An exact resume plans epoch 2 in a fresh process, without the plans of epochs 0 and 1 and with the global
    generators elsewhere: it must get the batches the first process had."""
    restarted = plan_epoch(50, 8, seed=3, epoch=2)
    for epoch in range(3):
        move_global_random_state()
        a = plan_epoch(50, 8, seed=3, epoch=epoch)
    np.testing.assert_array_equal(a.indices, restarted.indices)
    np.testing.assert_array_equal(a.weights, restarted.weights)
    assert not np.array_equal(a.indices, plan_epoch(50, 8, seed=3, epoch=3).indices)
    assert not np.array_equal(a.indices, plan_epoch(50, 8, seed=4, epoch=2).indices)
    assert not np.array_equal(a.indices.ravel()[:50], np.arange(50))  # shuffled


@pytest.mark.parametrize(("num", "batch", "steps"), [(10, 4, 5), (10, 4, 1), (7, 3, 9), (16, 8, 2)])
def test_plan_fixed_steps(num, batch, steps):
    plan = plan_epoch(num, batch, seed=0, epoch=1, steps=steps)
    assert plan.steps == steps
    assert plan.indices.shape == (steps, batch)
    assert np.all(plan.weights == 1)
    counts = np.bincount(plan.indices.ravel(), minlength=num)
    assert len(counts) == num
    # consecutive full permutations: no example is used twice before all others were used once
    assert counts.max() - counts.min() <= 1
    assert counts.sum() == steps * batch


def test_plan_steps_of_one_pass_is_the_one_pass_plan():
    """`steps` that one pass fills (the last batch in part) plan that pass, padding and all: a config that fixes
    an epoch's steps at its set's one pass trains on that set as with steps=0, and on a larger one for as long."""
    one_pass = plan_epoch(8820, 64, seed=0, epoch=3)
    fixed = plan_epoch(8820, 64, seed=0, epoch=3, steps=138)
    np.testing.assert_array_equal(fixed.indices, one_pass.indices)
    np.testing.assert_array_equal(fixed.weights, one_pass.weights)
    assert fixed.weights.sum() == 8820

    larger = [plan_epoch(9712, 64, seed=0, epoch=epoch, steps=138) for epoch in (0, 1)]
    for plan in larger:
        assert plan.indices.shape == (138, 64) and np.all(plan.weights == 1)
        assert len(np.unique(plan.indices)) == 138 * 64  # no image twice in an epoch
    assert set(np.unique(larger[0].indices)) != set(np.unique(larger[1].indices))  # each epoch its own subset


@pytest.mark.parametrize(
    ("num", "batch"),
    [
        (5, 8),
        (3, 8),
        (1, 4),
    ],
)
def test_plan_batch_larger_than_dataset_is_padded(num, batch):
    """One step holding all examples plus weight-0 padding, even when the pad exceeds the data size."""
    plan = plan_epoch(num, batch, seed=0, epoch=0)
    assert plan.indices.shape == (1, batch)
    assert sorted(plan.indices[0][plan.weights[0] == 1].tolist()) == list(range(num))
    assert plan.indices.min() >= 0 and plan.indices.max() < num


# -- subsets ---------------------------------------------------------------------------------------
def test_stratified_subset_keeps_class_proportions():
    labels = np.repeat(np.arange(4), [10, 20, 3, 40])
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    subset = stratified_subset(labels, 0.5, seed=7)
    counts = np.bincount(labels[subset], minlength=4).tolist()
    assert counts == [5, 10, 2, 20]
    assert np.all(np.diff(subset) > 0)  # sorted, unique
    small = stratified_subset(labels, 0.05, seed=7)
    assert np.bincount(labels[small], minlength=4).tolist() == [1, 1, 1, 2]  # at least one per class


def test_stratified_subset_is_a_function_of_its_seed_alone():
    """A downstream run and the colour baseline of the same seed draw their subsets at different points of the
    job (the run after other seeding of the global generators): they must label the same images."""
    labels = np.repeat(np.arange(3), 30)
    a = stratified_subset(labels, 0.3, seed=1)
    move_global_random_state()
    np.testing.assert_array_equal(a, stratified_subset(labels, 0.3, seed=1))
    assert not np.array_equal(a, stratified_subset(labels, 0.3, seed=2))


def test_stratified_subset_full_fraction_is_everything():
    labels = np.array([1, 0, 1, 1, 0])
    np.testing.assert_array_equal(stratified_subset(labels, 1.0, seed=0), np.arange(5))


def test_random_subset():
    a = random_subset(100, 10, seed=5)
    assert len(a) == 10 and len(set(a.tolist())) == 10
    assert np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 100
    move_global_random_state()  # a restarted pretrain draws its image subset again, elsewhere in the job
    np.testing.assert_array_equal(a, random_subset(100, 10, seed=5))
    assert not np.array_equal(a, random_subset(100, 10, seed=6))
    np.testing.assert_array_equal(random_subset(7, 0, seed=0), np.arange(7))
    np.testing.assert_array_equal(random_subset(7, 7, seed=0), np.arange(7))
    np.testing.assert_array_equal(random_subset(7, 50, seed=0), np.arange(7))


def augment(images, seed: int, padding: int):
    """The pipeline's augmentation for one batch, drawn as the pipeline draws it."""
    flips, offsets, _ = draw_augmentation(seed, 0, 0, len(images), padding)
    return augment_batch(tf.constant(images), flips, offsets, padding).numpy()


# -- packed pixels ---------------------------------------------------------------------------------
def test_pack_rgbx_round_trip(images):
    packed = pack_rgbx(images)
    assert packed.shape == images.shape[:3] and packed.dtype == np.int32
    rgbx = tf.bitcast(tf.constant(packed), tf.uint8)
    np.testing.assert_array_equal(model_pixels(rgbx).numpy(), images.astype(np.float32))
    np.testing.assert_array_equal(model_pixels(tf.constant(images)).numpy(), images.astype(np.float32))


@pytest.mark.parametrize("chunk", [3, 4096])
def test_image_store_holds_the_images_once_and_gathers_them_packed(images, chunk):
    """The store holds 3 bytes a pixel (the decoded images themselves); a gathered batch is packed RGBX."""
    store = ImageStore(images, chunk=chunk)
    assert store.shape == (N, SIZE, SIZE)
    assert store.variable.dtype == tf.uint8 and store.variable.shape == images.shape
    np.testing.assert_array_equal(store.variable.numpy(), images)
    index = tf.constant([2, 0, 2])
    np.testing.assert_array_equal(store.gather(index).numpy(), pack_rgbx(images[[2, 0, 2]]))


def rotate_four_reference(images: tf.Tensor) -> tf.Tensor:
    """[B, H, W, ...] → [4B, H, W, ...], block k = images rotated k*90° counter-clockwise (any trailing dims)."""
    transposed = tf.transpose(images, [0, 2, 1, *range(3, images.shape.rank)])
    return tf.concat(
        [images, tf.reverse(transposed, [1]), tf.reverse(images, [1, 2]), tf.reverse(transposed, [2])], axis=0
    )


def test_packed_augmentation_and_rotation_equal_the_rgb_ones(images):
    """Moving one int32 per pixel gives exactly the images that moving three bytes gives."""
    flips, offsets, _ = draw_augmentation(3, 0, 0, N, padding=2)
    rgb = rotate_four_reference(augment_batch(tf.constant(images), flips, offsets, 2))
    packed = rotate_four_reference(augment_batch(tf.constant(pack_rgbx(images)), flips, offsets, 2))
    np.testing.assert_array_equal(tf.bitcast(packed, tf.uint8).numpy()[..., :3], rgb.numpy())
    fused = augment_and_rotate(tf.constant(pack_rgbx(images)), flips, offsets, 2)
    np.testing.assert_array_equal(fused.numpy(), packed.numpy())
    for k in range(NUM_ROTATIONS):
        block = rgb.numpy()[k * N : (k + 1) * N]
        np.testing.assert_array_equal(block, tf.image.rot90(rgb[:N], k).numpy())


# -- augmentation ----------------------------------------------------------------------------------
def test_augment_without_padding_only_flips(images):
    out = augment(images, 0, padding=0)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]
    flipped = 0
    for x, y in zip(images, out, strict=True):
        same, mirror = np.array_equal(x, y), np.array_equal(x[:, ::-1], y)
        assert same or mirror
        flipped += mirror
    assert 0 < flipped < len(images)  # both happen with p = 0.5


def test_augmentation_is_a_function_of_seed_epoch_and_step_alone(images):
    """A resumed epoch draws step 5's flips and crops without having drawn steps 0-4, after other seeding."""
    def draw(seed: int, epoch: int, step: int) -> np.ndarray:
        flips, offsets, _ = draw_augmentation(seed, epoch, step, N, padding=2)
        return augment_batch(tf.constant(images), flips, offsets, 2).numpy()

    restarted = draw(4, 1, 5)
    for step in range(6):
        move_global_random_state()
        ongoing = draw(4, 1, step)
    np.testing.assert_array_equal(ongoing, restarted)
    for other in (draw(5, 1, 5), draw(4, 2, 5), draw(4, 1, 6)):  # another seed, epoch or step
        assert not np.array_equal(other, restarted)


def test_augment_with_padding_crops_the_reflect_padded_image(images):
    pad = 2
    out = augment(images, 1, padding=pad)
    assert out.shape == images.shape and out.dtype == np.uint8
    moved = 0
    for x, y in zip(images, out, strict=True):
        windows = []
        for source in (x, x[:, ::-1]):
            padded = np.pad(source, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
            windows += [
                (dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                if np.array_equal(padded[dy : dy + SIZE, dx : dx + SIZE], y)
            ]
        assert windows, "output is not a crop of the (possibly mirrored) padded input"
        moved += (pad, pad) not in windows
    assert moved > 0


@pytest.mark.parametrize("padding", [0, 3])
def test_scaled_crops_resize_a_window_of_the_padded_image_by_nearest_neighbour(images, padding):
    """With min_area < 1 each output is a square window, of the drawn side, of the (mirrored) reflect-padded image,
    sampled at its cells' centres; its four rotations are the scaled crop's."""
    min_area = 0.3
    flips, offsets, sides = draw_augmentation(7, 2, 3, N, padding, SIZE, min_area)
    flips, offsets, sides = flips.numpy(), offsets.numpy(), sides.numpy()
    assert sides.min() >= round(np.sqrt(min_area) * SIZE) and sides.max() <= SIZE and len(set(sides)) > 1
    assert np.all(offsets >= 0) and np.all(offsets <= (2 * padding + SIZE - sides)[:, None])
    out = augment_batch(tf.constant(images), flips, offsets, padding, sides).numpy()
    for x, y, flip, (top, left), side in zip(images, out, flips, offsets, sides, strict=True):
        source = x[:, ::-1] if flip else x
        padded = np.pad(source, ((padding, padding), (padding, padding), (0, 0)), mode="reflect")
        window = padded[top : top + side, left : left + side]
        cells = ((np.arange(SIZE) + 0.5) * side / SIZE).astype(int)
        np.testing.assert_array_equal(y, window[cells][:, cells])
    rotated = augment_and_rotate(tf.constant(images), flips, offsets, padding, sides)
    np.testing.assert_array_equal(rotated.numpy(), rotate_four_reference(tf.constant(out)).numpy())


def test_full_area_crops_draw_and_cut_exactly_the_plain_crops(images):
    """min_area = 1 keeps the plain crop's draws, and a drawn side of the whole image is the plain crop."""
    flips, offsets, sides = draw_augmentation(4, 1, 5, N, 2, SIZE, 1.0)
    plain_flips, plain_offsets, _ = draw_augmentation(4, 1, 5, N, 2)
    assert sides is None
    np.testing.assert_array_equal(flips.numpy(), plain_flips.numpy())
    np.testing.assert_array_equal(offsets.numpy(), plain_offsets.numpy())
    whole = tf.fill([N], SIZE)
    np.testing.assert_array_equal(augment_batch(tf.constant(images), flips, offsets, 2, whole).numpy(),
                                  augment_batch(tf.constant(images), flips, offsets, 2).numpy())


# -- tf.data training pipeline ---------------------------------------------------------------------
def test_train_dataset_rotations(images):
    plan = plan_epoch(N, 4, seed=0, epoch=0)
    labels = np.arange(N)
    batches = collect(train_dataset(images, labels, plan, seed=0, epoch=0, rotations=True, padding=0))
    assert len(batches) == plan.steps == 6
    for step, batch in enumerate(batches):
        assert set(batch) == {"images", "labels", "weights", "rotations"}
        x = batch["images"]
        assert x.shape == (16, SIZE, SIZE, 3) and x.dtype == np.uint8
        assert batch["rotations"].tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
        assert batch["labels"].dtype == np.int32 and batch["weights"].dtype == np.float32
        for k in range(NUM_ROTATIONS):
            np.testing.assert_array_equal(x[4 * k : 4 * k + 4], tf.image.rot90(x[:4], k).numpy())
            np.testing.assert_array_equal(batch["labels"][4 * k : 4 * k + 4], plan.indices[step])
            np.testing.assert_array_equal(batch["weights"][4 * k : 4 * k + 4], plan.weights[step])
        for i, index in enumerate(plan.indices[step]):  # upright block: the planned image, maybe mirrored
            assert np.array_equal(x[i], images[index]) or np.array_equal(x[i], images[index][:, ::-1])
    upright = [int(i) for b in batches for i, w in zip(b["labels"][:4], b["weights"][:4], strict=True) if w]
    assert sorted(upright) == list(range(N))


def test_shuffle_colours_reorders_each_packed_samples_channels(images):
    """Every one of the six orders, on packed RGBX words: output channel c is input channel order[c], the fourth
    byte stays zero."""
    x = np.concatenate([images[:4]] * 3)[: 2 * len(COLOUR_ORDERS)]
    orders = np.arange(len(x)) % len(COLOUR_ORDERS)
    out = tf.bitcast(shuffle_colours(tf.constant(pack_rgbx(x)), tf.constant(orders, tf.int32)), tf.uint8).numpy()
    assert not out[..., 3].any()
    for image, shuffled, order in zip(x, out, orders, strict=True):
        np.testing.assert_array_equal(shuffled[..., :3], image[..., list(COLOUR_ORDERS[order])])


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_shuffled_colours_are_the_plain_batches_in_each_samples_colour_order(images, fraction):
    """The same batches as without shuffled colours, each sample's channels in its drawn order: its own with
    probability 1 - fraction, else one of the other five; the draws a function of (seed, epoch, step)."""
    plan = plan_epoch(N, 4, seed=3, epoch=1)
    kwargs = dict(seed=3, epoch=1, padding=2, rotations=True, min_crop_area=0.5)
    plain = collect(train_dataset(images, np.arange(N), plan, **kwargs))
    shuffled = collect(train_dataset(images, np.arange(N), plan, shuffled_colours=fraction, **kwargs))
    again = collect(train_dataset(images, np.arange(N), plan, shuffled_colours=fraction, **kwargs))
    orders = np.concatenate([b["colour_orders"] for b in shuffled])
    for base, batch, repeat in zip(plain, shuffled, again, strict=True):
        assert set(batch) == set(base) | {"colour_orders"}
        for key in base.keys() - {"images"}:
            np.testing.assert_array_equal(batch[key], base[key])
        for image, sample, order in zip(base["images"], batch["images"], batch["colour_orders"], strict=True):
            np.testing.assert_array_equal(sample, image[..., list(COLOUR_ORDERS[order])])
        np.testing.assert_array_equal(repeat["colour_orders"], batch["colour_orders"])
    shuffled_share = np.mean(orders > 0)
    assert orders.max() < len(COLOUR_ORDERS) and set(orders[orders > 0]) == set(range(1, len(COLOUR_ORDERS)))
    assert shuffled_share == 1.0 if fraction == 1.0 else 0.3 < shuffled_share < 0.7


def test_shuffled_colours_of_a_replica_are_its_slice_of_the_global_batch(images):
    """Drawn for the whole global batch: two replicas of a pipeline see the orders of their images' slice."""
    plan = plan_epoch(N, 8, seed=0, epoch=0)
    kwargs = dict(seed=0, epoch=0, rotations=True, shuffled_colours=0.5)
    whole = collect(train_dataset(images, np.arange(N), plan, **kwargs))
    parts = collect(train_dataset(images, np.arange(N), plan, **kwargs,
                                  sharding=Sharding(pipeline_id=0, num_pipelines=1, replicas_per_pipeline=2)))
    for step, full in enumerate(whole):
        by_rotation = full["colour_orders"].reshape(NUM_ROTATIONS, 8)
        for replica in range(2):
            mine = parts[2 * step + replica]["colour_orders"].reshape(NUM_ROTATIONS, 4)
            np.testing.assert_array_equal(mine, by_rotation[:, 4 * replica : 4 * replica + 4])


def test_shuffled_colours_need_rotations(images):
    with pytest.raises(ValueError, match="rotations"):
        train_dataset(images, np.arange(N), plan_epoch(N, 4, seed=0, epoch=0), seed=0, epoch=0,
                      shuffled_colours=0.5)


def test_train_dataset_without_rotations(images):
    plan = plan_epoch(N, 8, seed=1, epoch=0)
    batches = collect(train_dataset(images, np.arange(N), plan, seed=1, epoch=0, padding=1))
    assert [b["images"].shape for b in batches] == [(8, SIZE, SIZE, 3)] * 3
    assert all(np.all(b["rotations"] == 0) for b in batches)
    assert sorted(real_indices(batches)) == list(range(N))
    assert sum(int((b["weights"] == 0).sum()) for b in batches) == 3 * 8 - N


def test_train_dataset_is_deterministic(images):
    plan = plan_epoch(N, 4, seed=2, epoch=1)
    kwargs = dict(seed=2, epoch=1, padding=2, rotations=True)
    a = collect(train_dataset(images, np.arange(N), plan, **kwargs))
    b = collect(train_dataset(images, np.arange(N), plan, **kwargs))
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    other = collect(train_dataset(images, np.arange(N), plan, **{**kwargs, "epoch": 2}))
    assert not all(np.array_equal(x["images"], y["images"]) for x, y in zip(a, other, strict=True))


@pytest.mark.parametrize("start", [1, 3, 5])
def test_train_dataset_resume_matches_tail(images, start):
    plan = plan_epoch(N, 4, seed=0, epoch=3)
    kwargs = dict(seed=0, epoch=3, padding=2, rotations=True)
    full = collect(train_dataset(images, np.arange(N), plan, **kwargs))
    resumed = collect(train_dataset(images, np.arange(N), plan, start_step=start, **kwargs))
    assert len(resumed) == len(full) - start
    for x, y in zip(full[start:], resumed, strict=True):
        assert x["images"].dtype == y["images"].dtype == np.uint8
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_train_dataset_start_at_end_is_empty(images):
    plan = plan_epoch(N, 4, seed=0, epoch=0)
    assert collect(train_dataset(images, np.arange(N), plan, seed=0, epoch=0, start_step=plan.steps)) == []


@pytest.mark.parametrize("start", [0, 2])
def test_train_epochs_are_the_epochs_one_after_the_other(images, start):
    """A fit's one dataset: epoch 3 from step `start`, then epochs 4 and 5 whole, each as its own would be."""
    def plans(epoch: int) -> BatchPlan:
        return plan_epoch(N, 4, seed=5, epoch=epoch)

    kwargs = dict(seed=5, padding=2, rotations=True)
    fit = collect(train_epochs(images, np.arange(N), plans, range(3, 6), start_step=start, **kwargs))
    epochs = [collect(train_dataset(images, np.arange(N), plans(e), epoch=e, start_step=start if e == 3 else 0,
                                    **kwargs)) for e in range(3, 6)]
    assert [len(e) for e in epochs] == [plans(3).steps - start, plans(4).steps, plans(5).steps]
    expected = [batch for epoch in epochs for batch in epoch]
    assert len(fit) == len(expected)
    for x, y in zip(fit, expected, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_train_epochs_draw_each_plan_when_the_pipeline_reaches_its_epoch(images):
    """Plans are drawn lazily (a fit of many epochs holds one at a time) and must keep the first's shape."""
    drawn = []

    def plans(epoch: int) -> BatchPlan:
        drawn.append(epoch)
        return plan_epoch(N, 4 if epoch < 2 else 8, seed=0, epoch=epoch)

    iterator = iter(train_epochs(images, np.arange(N), plans, range(0, 3), seed=0, prefetch=1))
    next(iterator)
    assert 2 not in drawn
    with pytest.raises(tf.errors.InvalidArgumentError, match="epoch 2 is planned as"):
        for _ in iterator:
            pass
    assert collect(train_epochs(images, np.arange(N), plans, range(4, 4), seed=0)) == []


@pytest.mark.parametrize("rotations", [False, True])
def test_sharding_splits_each_epoch_between_pipelines(images, rotations):
    plan = plan_epoch(N, 8, seed=0, epoch=0)
    shards = []
    for pipeline in range(2):
        sharding = Sharding(pipeline_id=pipeline, num_pipelines=2)
        batches = collect(
            train_dataset(images, np.arange(N), plan, seed=0, epoch=0, padding=1, rotations=rotations,
                          sharding=sharding)
        )
        per_replica = 4 * (NUM_ROTATIONS if rotations else 1)
        assert len(batches) == plan.steps
        assert all(b["images"].shape == (per_replica, SIZE, SIZE, 3) for b in batches)
        upright = [
            int(i) for b in batches for i, w, r in zip(b["labels"], b["weights"], b["rotations"], strict=True)
            if w == 1 and r == 0
        ]
        shards.append(upright)
    assert len(set(shards[0])) == len(shards[0]) and len(set(shards[1])) == len(shards[1])
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(N))


def test_sharded_pipelines_see_the_global_batch_slices(images):
    """Pipeline i's step s holds exactly the i-th half of global batch s, with the same augmentation."""
    plan = plan_epoch(N, 8, seed=0, epoch=0)
    whole = collect(train_dataset(images, np.arange(N), plan, seed=0, epoch=0, padding=2))
    for pipeline in range(2):
        part = collect(train_dataset(images, np.arange(N), plan, seed=0, epoch=0, padding=2,
                                     sharding=Sharding(pipeline, 2)))
        for full, mine in zip(whole, part, strict=True):
            np.testing.assert_array_equal(mine["images"], full["images"][pipeline * 4 : pipeline * 4 + 4])
            np.testing.assert_array_equal(mine["labels"], full["labels"][pipeline * 4 : pipeline * 4 + 4])


@pytest.mark.parametrize("rotations", [False, True])
def test_replicas_per_pipeline(images, rotations):
    plan = plan_epoch(N, 8, seed=0, epoch=0)
    sharding = Sharding(pipeline_id=0, num_pipelines=1, replicas_per_pipeline=2)
    elements = collect(train_dataset(images, np.arange(N), plan, seed=0, epoch=0, rotations=rotations,
                                     sharding=sharding))
    assert len(elements) == 2 * plan.steps  # one element per replica per step
    per_replica = 4 * (NUM_ROTATIONS if rotations else 1)
    assert all(e["images"].shape == (per_replica, SIZE, SIZE, 3) for e in elements)
    for step in range(plan.steps):
        for replica in range(2):
            element = elements[2 * step + replica]
            expected = plan.indices[step, replica * 4 : replica * 4 + 4]
            np.testing.assert_array_equal(element["labels"][:4], expected)
            if rotations:
                x = element["images"]
                for k in range(NUM_ROTATIONS):
                    np.testing.assert_array_equal(x[4 * k : 4 * k + 4], tf.image.rot90(x[:4], k).numpy())
    upright = [
        int(i) for e in elements for i, w, r in zip(e["labels"], e["weights"], e["rotations"], strict=True)
        if w == 1 and r == 0
    ]
    assert sorted(upright) == list(range(N))


def test_batch_that_does_not_split_is_rejected(images):
    plan = plan_epoch(N, 6, seed=0, epoch=0)
    with pytest.raises(ValueError, match="does not split"):
        train_dataset(images, np.arange(N), plan, seed=0, epoch=0, sharding=Sharding(0, 4))


def test_plan_with_remapped_indices(images):
    """Stages plan over a subset and remap (BatchPlan(indices[plan.indices], ...)); the pipeline follows."""
    subset = np.array([3, 5, 8, 13, 21])
    plan = plan_epoch(len(subset), 2, seed=0, epoch=0)
    plan = BatchPlan(subset[plan.indices], plan.weights)
    batches = collect(train_dataset(images, np.arange(N), plan, seed=0, epoch=0))
    assert sorted(real_indices(batches)) == subset.tolist()


# -- evaluation batches ----------------------------------------------------------------------------
def test_eval_batches_are_deterministic_and_in_order(images):
    labels = np.arange(N) % 3
    first = list(eval_batches(images, labels, 8))
    second = list(eval_batches(images, labels, 8))
    assert [len(b[0]) for b in first] == [8, 8, 6]
    for a, b in zip(first, second, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in first]), images)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in first]), labels)
    assert all(np.all(b[2] == 0) for b in first)


def test_eval_batches_with_rotations(images):
    labels = np.arange(N)
    batches = list(eval_batches(images, labels, 5, rotations=True))
    assert len(batches) == 5
    x, y, angles = batches[-1]  # the short last batch: 2 images
    assert x.shape == (8, SIZE, SIZE, 3)
    assert y.tolist() == [20, 21] * 4
    assert angles.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for k in range(NUM_ROTATIONS):
        np.testing.assert_array_equal(x[2 * k : 2 * k + 2], tf.image.rot90(images[20:], k).numpy())
    again = list(eval_batches(images, labels, 5, rotations=True))
    for a, b in zip(batches, again, strict=True):
        for u, v in zip(a, b, strict=True):
            np.testing.assert_array_equal(u, v)


def test_eval_batches_accept_memory_maps(images, tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, images)
    mapped = np.load(path, mmap_mode="r")
    batches = list(eval_batches(mapped, np.arange(N), 10))
    assert all(type(b[0]) is np.ndarray for b in batches)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), images)
