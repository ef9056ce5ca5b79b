"""job.task: the one shape of a training (a Task run by its own Trainer), the loop's settings built from the
runtime section, the input builder given only its sections; job.precision's settings per cluster; and the
pretext task built from its config sections, the dataset and the cluster, without a Context."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from job.config import DataConfig, ModelConfig, PretextConfig, RuntimeConfig
from job.data import Dataset, ImageSet
from job.distribute import Cluster
from job.precision import mixed_precision, use_xla
from job.task import Task, dataset_fn, loop_config
from job.train import ParamGroup, WarmupCosine, make_optimizer
from models.heads import NUM_ROTATIONS

EPOCHS, STEPS, BATCH = 2, 3, 4
CADENCE = {"checkpoint_every_steps": 2, "keep_checkpoints": 5, "log_every_steps": 1}
IMAGE_SIZE, IMAGES = 32, 12  # MobileNetV2 takes 32 px at least


def _cluster(gpus: int = 0) -> Cluster:
    return Cluster(tf.distribute.OneDeviceStrategy("/cpu:0"), True, 0, 1, gpus, "single")


def test_loop_config_takes_the_length_from_the_task_and_the_cadence_from_runtime():
    loop = loop_config(RuntimeConfig(**CADENCE), epochs=EPOCHS, steps_per_epoch=STEPS, samples_per_step=BATCH,
                       patience=1, monitor="accuracy", xla=True, fresh_batchnorm=False)
    assert (loop.epochs, loop.steps_per_epoch, loop.samples_per_step) == (EPOCHS, STEPS, BATCH)
    assert {key: getattr(loop, key) for key in CADENCE} == CADENCE
    assert (loop.patience, loop.monitor, loop.xla, loop.fresh_batchnorm) == (1, "accuracy", True, False)


@pytest.mark.parametrize("setting, gpus, expected", [
    ("on", 0, True), ("off", 1, False), ("auto", 0, False), ("auto", 1, True),
])
def test_mixed_precision_and_xla_follow_their_runtime_key_and_the_cluster(setting, gpus, expected):
    runtime = RuntimeConfig(mixed_precision=setting, xla="off")
    assert mixed_precision(runtime, _cluster(gpus)) is expected
    assert use_xla(runtime, _cluster(gpus)) is False
    assert use_xla(RuntimeConfig(xla=setting), _cluster(gpus)) is expected


def _images(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def _three_class_dataset() -> Dataset:
    """IMAGES random train images and as many val ones, in three classes."""
    labels = np.arange(IMAGES, dtype=np.int32) % 3
    split = ImageSet(_images(), labels, [f"{i}.JPEG" for i in range(IMAGES)])
    return Dataset(["n0", "n1", "n2"], {}, split, ImageSet(_images(1), labels, list(split.files)))


def test_dataset_fn_needs_only_the_data_section_and_a_seed():
    images, labels = _images(), np.arange(IMAGES, dtype=np.int32) % 3
    data = DataConfig(image_size=IMAGE_SIZE, crop_padding=2, prefetch_batches=1)

    def first_batch(seed: int, rotations: bool) -> dict:
        make = dataset_fn(images, labels, np.arange(IMAGES), BATCH, STEPS, data=data, seed=seed, rotations=rotations)
        batches = list(make(range(1), 0, None))
        assert len(batches) == STEPS
        return {k: np.asarray(v) for k, v in batches[0].items()}

    rotated = first_batch(seed=1, rotations=True)
    assert rotated["images"].shape[0] == NUM_ROTATIONS * BATCH
    np.testing.assert_array_equal(rotated["rotations"], np.repeat(np.arange(NUM_ROTATIONS), BATCH))
    assert first_batch(seed=1, rotations=False)["images"].shape[0] == BATCH
    again, other = first_batch(seed=1, rotations=True), first_batch(seed=2, rotations=True)
    np.testing.assert_array_equal(again["images"], rotated["images"])  # a function of the seed alone
    assert not np.array_equal(other["labels"], rotated["labels"]) or not np.array_equal(other["images"],
                                                                                         rotated["images"])


def test_a_task_is_trained_by_its_own_trainer_with_its_loop(tmp_path):
    """Task.trainer hands the task's model, objective, groups and loop to the Trainer: it trains every step of
    the loop and checkpoints at the runtime section's cadence."""
    cluster = _cluster()
    with cluster.strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
        optimizer = make_optimizer("adamw", WarmupCosine(0.1, 0, EPOCHS * STEPS), weight_decay=0.0)

    def objective(batch, training):
        loss = keras.losses.sparse_categorical_crossentropy(batch["y"], model(batch["x"], training=training),
                                                            from_logits=True)
        return loss, {"loss": (tf.reduce_sum(loss), tf.cast(tf.size(loss), tf.float32))}

    def inputs(epochs: range, start_step: int, context) -> tf.data.Dataset:
        batch = {"x": np.ones((BATCH, 2), np.float32), "y": np.zeros(BATCH, np.int32)}
        return tf.data.Dataset.from_tensors(batch).repeat(len(epochs) * STEPS - start_step)

    evaluated = []
    loop = loop_config(RuntimeConfig(**CADENCE), epochs=EPOCHS, steps_per_epoch=STEPS, samples_per_step=BATCH,
                       patience=0, monitor="accuracy", xla=False, fresh_batchnorm=False)
    task = Task(model, objective, [ParamGroup(model.trainable_variables, optimizer)], inputs,
                lambda epoch, writer: evaluated.append(epoch) or {"accuracy": 0.5}, loop)
    trainer = task.trainer(cluster, tmp_path / "stage", tmp_path / "logs")
    result = trainer.fit(task.dataset_fn, task.evaluator)
    trainer.close()
    assert (result.steps, result.epochs, evaluated) == (EPOCHS * STEPS, EPOCHS, [0, 1])
    kept = sorted(int(p.name.split("-")[1].split(".")[0]) for p in (tmp_path / "stage" / "ckpt").glob("ckpt-*.index"))
    assert kept == [2, 4, 6]  # every checkpoint_every_steps and the fit's end (not 3, the first epoch's end)


def test_the_pretext_task_is_built_from_its_sections_the_dataset_and_the_cluster():
    from job.pretext import PretextTask, build_pretext_task

    data = _three_class_dataset()
    pretext = PretextConfig(epochs=EPOCHS, batch_images=BATCH, max_images=8, warmup_epochs=0.0)
    task = build_pretext_task(pretext, ModelConfig(alpha=0.35, stem_stride=1), DataConfig(image_size=IMAGE_SIZE),
                              RuntimeConfig(**CADENCE), data, _cluster())
    assert isinstance(task, PretextTask) and isinstance(task, Task)
    assert len(task.train_indices) == 8 and task.loop.steps_per_epoch == 8 // BATCH
    assert task.loop.samples_per_step == NUM_ROTATIONS * BATCH and task.loop.monitor == "rotation_accuracy"
    assert {key: getattr(task.loop, key) for key in CADENCE} == CADENCE
    assert task.groups[0].variables == task.model.trainable_variables and task.optimizer is task.groups[0].optimizer
    batch = next(iter(task.dataset_fn(range(1), 0, None)))
    per_example, metrics = task.objective(batch, False)
    assert per_example.shape[0] == NUM_ROTATIONS * BATCH and set(metrics) >= {"loss", "rotation_accuracy"}


def _one_epoch_pretext(tmp_path, **pretext_keys) -> tuple:
    """A pretext task on three classes (alpha 0.35, SGD at a rate that moves every trained weight), its dataset,
    and a function that trains it for one epoch; the task's variables are untouched until that is called."""
    from job.pretext import build_pretext_task

    data = _three_class_dataset()
    pretext = PretextConfig(epochs=1, batch_images=BATCH, warmup_epochs=0.0, optimizer="sgd", learning_rate=0.5,
                            online_probe=False, **pretext_keys)
    cluster = _cluster()
    task = build_pretext_task(pretext, ModelConfig(alpha=0.35), DataConfig(image_size=IMAGE_SIZE),
                              RuntimeConfig(**CADENCE), data, cluster)

    def train() -> None:
        trainer = task.trainer(cluster, tmp_path / "stage", tmp_path / "logs")
        trainer.fit(task.dataset_fn, lambda epoch, writer: {"rotation_accuracy": 0.0})
        trainer.close()

    return task, data, train


def test_pretext_head_layer_trains_the_layers_up_to_it_and_exports_a_loadable_rotation_model(tmp_path):
    """pretext.head_layer = block_5_add: the rotation head reads that layer's pooled output, the layers up to it
    train while the later ones keep their initial weights, and the saved rotation model loads and predicts."""
    from models.backbone import load_model, variables_through

    task, data, train = _one_epoch_pretext(tmp_path, head_layer="block_5_add")
    through = {id(v) for v in variables_through(task.backbone, "block_5_add")}
    later = [v for v in task.backbone.trainable_variables if id(v) not in through]
    trained = {id(v) for v in task.groups[0].variables}
    assert later and not any(id(v) in trained for v in later) and through <= trained
    body = next(layer for layer in task.backbone.layers if isinstance(layer, keras.Model))
    block_5_channels = body.get_layer("block_5_add").output.shape[-1]
    assert task.rotation_model.get_layer("rotation_head").input.shape[-1] == block_5_channels
    before = {v.path: v.numpy().copy() for v in task.backbone.variables}

    train()
    for v in later:
        np.testing.assert_array_equal(v.numpy(), before[v.path], err_msg=v.path)
    moved = [v for v in task.backbone.trainable_variables if "kernel" in v.path and id(v) in through]
    assert moved and all(not np.array_equal(v.numpy(), before[v.path]) for v in moved)
    task.rotation_model.save(tmp_path / "rotation.keras")
    images = np.asarray(data.train.images[:2])
    np.testing.assert_allclose(load_model(tmp_path / "rotation.keras")(images), task.rotation_model(images),
                               rtol=1e-5, atol=1e-5)


def test_pretext_frozen_through_keeps_the_shallow_layers_initial_and_trains_the_rest(tmp_path):
    """pretext.frozen_through = block_2_add: after training, every weight of the layers up to it is its initial
    value while the deeper layers and the head moved; the frozen layers' BN statistics still follow the data."""
    from models.backbone import variables_through

    task, _, train = _one_epoch_pretext(tmp_path, frozen_through="block_2_add")
    frozen = variables_through(task.backbone, "block_2_add")
    frozen_ids = {id(v) for v in frozen}
    assert frozen and all(id(v) not in frozen_ids for v in task.groups[0].variables)
    assert len(task.groups[0].variables) == len(task.model.trainable_variables) - len(frozen)
    statistics = [v for v in task.backbone.non_trainable_variables if "bn_Conv1" in v.path]
    before = {v.path: v.numpy().copy() for v in task.model.variables}

    train()
    for v in frozen:
        np.testing.assert_array_equal(v.numpy(), before[v.path], err_msg=v.path)
    trained = [v for v in task.backbone.trainable_variables if "kernel" in v.path and id(v) not in frozen_ids]
    assert all(not np.array_equal(v.numpy(), before[v.path]) for v in trained)
    assert statistics and all(not np.array_equal(v.numpy(), before[v.path]) for v in statistics)


def test_the_colour_order_task_adds_its_head_its_weighted_loss_and_its_val_accuracy():
    """pretext.colour_order_weight = 2: the batches carry each sample's colour order, a six-way head reads the
    rotation head's features, each sample's loss is its rotation loss plus twice its colour-order loss, and the
    validation scores the head on val images shown in every order in turn."""
    from job.losses import sparse_ce
    from job.pipelines import COLOUR_ORDERS, model_pixels
    from job.pretext import COLOUR_ORDER_HEAD, build_pretext_task, every_colour_order
    from job.probes import cross_entropy

    data = _three_class_dataset()
    pretext = PretextConfig(epochs=1, batch_images=BATCH, warmup_epochs=0.0, online_probe=False,
                            colour_order_weight=2.0, shuffled_colour_fraction=1.0)
    task = build_pretext_task(pretext, ModelConfig(alpha=0.35), DataConfig(image_size=IMAGE_SIZE),
                              RuntimeConfig(**CADENCE), data, _cluster())
    head = task.model.get_layer(COLOUR_ORDER_HEAD)
    assert head.output.shape[-1] == len(COLOUR_ORDERS)
    assert head.input.shape[-1] == task.rotation_model.get_layer("rotation_head").input.shape[-1]
    batch = next(iter(task.dataset_fn(range(1), 0, None)))
    orders = batch["colour_orders"].numpy()
    assert orders.shape == (NUM_ROTATIONS * BATCH,) and orders.min() >= 1  # every sample shuffled at 1.0

    per_example, metrics = task.objective(batch, False)
    rotation, _, colour = task.model(model_pixels(batch["images"]), training=False)
    expected = (sparse_ce(batch["rotations"], rotation) + 2.0 * sparse_ce(batch["colour_orders"], colour)) \
        * batch["weights"]
    np.testing.assert_allclose(per_example.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    hits, count = metrics["colour_order_accuracy"]
    correct = np.argmax(colour, -1) == orders
    assert (float(hits), float(count)) == pytest.approx((np.sum(correct * batch["weights"]), np.sum(batch["weights"])))
    # The logged losses: "loss" is the rotation loss alone, "colour_order_loss" the colour-order head's, unweighted.
    total, count = metrics["colour_order_loss"]
    colour_loss = sparse_ce(batch["colour_orders"], colour).numpy()
    assert float(total) / float(count) == pytest.approx(np.average(colour_loss, weights=batch["weights"]), rel=1e-5)
    total, count = metrics["loss"]
    assert float(total) / float(count) == pytest.approx(
        np.average(sparse_ce(batch["rotations"], rotation).numpy(), weights=batch["weights"]), rel=1e-5)

    shuffled, val_orders = every_colour_order(data.val.images)
    logits = task.model.predict(shuffled, verbose=0)[2]
    result = task.evaluator(0, tf.summary.create_noop_writer())
    assert result["colour_order_accuracy"] == pytest.approx(np.mean(np.argmax(logits, -1) == val_orders))
    assert result["colour_order_loss"] == pytest.approx(cross_entropy(logits, val_orders), rel=1e-4)


def test_pretext_weight_decay_exempt_spares_the_named_variables_and_names_a_typo():
    """pretext.weight_decay_exempt: with a zero gradient only the decay moves a weight, so one step leaves
    BatchNorm's scales and offsets and the depthwise kernels as they were, and shrinks every other kernel."""
    from job.errors import JobError
    from job.pretext import build_pretext_task

    cluster = Cluster(tf.distribute.get_strategy(), True, 0, 1, 0, "single")  # the default: eager updates

    def task(exempt: list[str]):
        pretext = PretextConfig(epochs=1, batch_images=BATCH, optimizer="sgd", learning_rate=0.1, weight_decay=0.5,
                                warmup_epochs=0.0, weight_decay_exempt=exempt)
        return build_pretext_task(pretext, ModelConfig(alpha=0.35), DataConfig(image_size=IMAGE_SIZE),
                                  RuntimeConfig(**CADENCE), _three_class_dataset(), cluster)

    exempt = ["gamma", "beta", "depthwise"]
    built = task(exempt)
    variables = built.groups[0].variables
    before = [np.asarray(v).copy() for v in variables]
    built.optimizer.apply_gradients([(tf.zeros_like(v), v) for v in variables])
    spared = [any(name in v.path for name in exempt) for v in variables]
    assert any("depthwise" in v.path for v in variables) and any(v.path.endswith("gamma") for v in variables)
    for variable, old, kept in zip(variables, before, spared, strict=True):
        # Zero-initialised variables (biases, BatchNorm's offsets) stay zero either way.
        assert np.array_equal(np.asarray(variable), old) == (kept or not old.any()), variable.path
    with pytest.raises(JobError, match=r"pretext\.weight_decay_exempt .* 'gama'"):
        task(["gama"])


def test_every_colour_order_shows_image_i_in_order_i_mod_6():
    from job.pipelines import COLOUR_ORDERS
    from job.pretext import every_colour_order

    images = _images()
    shuffled, orders = every_colour_order(images)
    assert orders.tolist() == [i % len(COLOUR_ORDERS) for i in range(IMAGES)]
    for image, out, order in zip(images, shuffled, orders, strict=True):
        np.testing.assert_array_equal(out, image[..., list(COLOUR_ORDERS[order])])


def test_without_the_colour_order_task_the_pretext_has_no_colour_head_nor_shuffled_batches():
    from job.pretext import COLOUR_ORDER_HEAD, build_pretext_task

    task = build_pretext_task(PretextConfig(epochs=1, batch_images=BATCH), ModelConfig(alpha=0.35),
                              DataConfig(image_size=IMAGE_SIZE), RuntimeConfig(**CADENCE), _three_class_dataset(),
                              _cluster())
    assert COLOUR_ORDER_HEAD not in [layer.name for layer in task.model.layers]
    assert "colour_orders" not in next(iter(task.dataset_fn(range(1), 0, None)))
