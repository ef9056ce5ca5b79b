"""Tests for job.probes's small evaluators: colour histograms, the linear probe, k-NN, confusion matrix."""

from __future__ import annotations

import numpy as np

from job.probes import (
    colour_histograms,
    confusion_matrix,
    cross_entropy,
    cross_validated_accuracy,
    fit_logistic,
    fold_ids,
    knn_accuracy,
    linear_probe,
)


def test_colour_histograms_count_each_pixel_in_its_rgb_cell():
    images = np.zeros((3, 4, 4, 3), np.uint8)
    images[0] = (255, 0, 0)  # all red: cell (3, 0, 0) with 4 bins
    images[1, :2] = (0, 0, 255)  # half blue (0, 0, 3), half black (0, 0, 0)
    images[2] = (64, 128, 191)  # cells 1, 2, 2
    features = colour_histograms(images, bins=4)
    assert features.shape == (3, 64) and features.dtype == np.float32
    np.testing.assert_allclose(features.sum(1), 1.0)
    assert features[0, (3 * 4 + 0) * 4 + 0] == 1.0
    assert features[1, 3] == features[1, 0] == 0.5
    assert features[2, (1 * 4 + 2) * 4 + 2] == 1.0
    assert colour_histograms(images, bins=2).shape == (3, 8)


def test_linear_probe_reads_the_informative_feature():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 30)
    features = rng.normal(size=(90, 5)).astype(np.float32)
    features[:, 0] += 6.0 * labels  # the class is readable from one feature, the other four are noise
    order = rng.permutation(90)
    train, val = order[:60], order[60:]

    def probe(y):
        return linear_probe(features[train], y[train], features[val], y[val], 3,
                            steps=200, learning_rate=0.05, weight_decay=1e-4)

    assert probe(labels) >= 0.9
    assert probe(rng.permutation(labels)) < 0.7  # labels unrelated to the features: near chance (1/3)


def test_folds_are_balanced_shuffled_and_seeded():
    folds = fold_ids(10, 4, seed=0)
    assert sorted(np.bincount(folds)) == [2, 2, 3, 3]
    np.testing.assert_array_equal(folds, fold_ids(10, 4, seed=0))
    assert any(not np.array_equal(fold_ids(10, 4, seed=s), folds) for s in (1, 2, 3))


def test_cross_validated_probe_scores_every_train_example_by_a_probe_that_never_saw_it():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    features = rng.normal(size=(80, 4)).astype(np.float32)
    features[:, 0] += 5.0 * labels
    settings = {"steps": 200, "learning_rate": 0.05, "weight_decay": 1e-4}
    folds = fold_ids(80, 4, seed=0)
    score = cross_validated_accuracy(features, labels, 2, folds, **settings)
    assert score >= 0.9 and (80 * score) == round(80 * score)  # a whole number of the 80 examples right
    assert cross_validated_accuracy(features, rng.permutation(labels), 2, folds, **settings) < 0.75
    # A feature that only identifies each example (its label memorised, nothing that generalises) fits every train
    # example and scores near chance on held-out folds: fitted on the held-out fold itself, it would read 1.0.
    memorised = np.eye(80, dtype=np.float32)
    assert linear_probe(memorised, labels, memorised, labels, 2, **settings) == 1.0
    assert cross_validated_accuracy(memorised, labels, 2, folds, **settings) < 0.75


def test_knn_votes_by_cosine_similarity():
    train = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    train_labels = np.array([0, 0, 1, 1])
    val = np.array([[5, 0.2], [0.1, 3]], np.float32)  # direction, not length, decides
    assert knn_accuracy(train, train_labels, val, np.array([0, 1]), k=2) == 1.0
    assert knn_accuracy(train, train_labels, val, np.array([1, 0]), k=2) == 0.0
    # k above the train size: all four neighbours vote, weighted by similarity, and the nearer class still wins.
    assert knn_accuracy(train, train_labels, val, np.array([0, 1]), k=50) == 1.0


def test_confusion_matrix_rows_are_true_classes():
    assert confusion_matrix(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), 2) == [[1, 1], [0, 2]]


def test_fit_logistic_returns_a_classifier_of_the_raw_features():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 40)
    features = rng.normal(size=(80, 3)).astype(np.float32) * [1.0, 50.0, 0.01] + [0.0, 300.0, -2.0]
    features[:, 2] += 0.05 * labels  # informative, on a tiny scale and far from zero: standardisation matters
    kernel, bias = fit_logistic(features, labels, 2, steps=300, learning_rate=0.05, weight_decay=1e-4)
    assert kernel.shape == (3, 2) and bias.shape == (2,)
    assert np.mean(np.argmax(features @ kernel + bias, -1) == labels) >= 0.95


def test_predict_traces_each_model_once_and_never_warns_of_retracing(caplog):
    """Several models evaluated back to back on a last batch smaller than the others (as the evaluate stage
    does): one trace per model, and no `tf.function retracing` warning (each model traced twice before)."""
    import logging

    import keras

    from job.probes import _compiled, predict

    models = [keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
              for _ in range(6)]
    images = np.arange(7 * 4 * 4 * 3, dtype=np.uint8).reshape(7, 4, 4, 3)
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        for model in models:
            assert predict(model, images, batch_size=3).shape == (7, 2)  # batches of 3, 3 and 1
            assert predict(model, images[:2], batch_size=3).shape == (2, 2)
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]
    for model in models:
        (function,) = _compiled[model].values()
        assert function.experimental_get_tracing_count() == 1


def test_knn_k_is_capped_below_the_number_of_training_images():
    from job.probes import capped_knn_k

    assert capped_knn_k(20, 200) == 20
    assert capped_knn_k(20, 20) == 19  # k not below the train images: every val image would see them all
    assert capped_knn_k(20, 8) == 7
    assert capped_knn_k(5, 1) == 1


def test_cross_entropy_is_the_training_loss_on_held_out_logits():
    """The validation loss TensorBoard shows beside val accuracy: the same softmax cross-entropy as training."""
    import tensorflow as tf

    logits = np.array([[2.0, -1.0, 0.5], [1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]], np.float32)  # one overflows exp
    labels = np.array([2, 0, 1], np.int32)
    expected = tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True).numpy().mean()
    np.testing.assert_allclose(cross_entropy(logits, labels), expected, atol=1e-5)
    assert cross_entropy(logits[:0], labels[:0]) == 0.0


def test_fit_logistic_in_one_traced_call_is_the_step_by_step_fit_bit_for_bit():
    """All the steps now run in one call of a traced loop; the fit must not change (the probes' and the
    transfer-layer choice's numbers). The reference is the former implementation, one call per step."""
    import tensorflow as tf

    rng = np.random.default_rng(1)
    features = rng.normal(size=(120, 12)).astype(np.float32)
    labels = rng.integers(0, 3, 120)
    steps, learning_rate, weight_decay, seed = 50, 0.05, 1e-3, 4

    mean, std = features.mean(0), features.std(0) + 1e-6
    x_train, y_train = tf.constant((features - mean) / std, tf.float32), tf.constant(labels, tf.int32)
    weights = tf.Variable(tf.keras.initializers.GlorotUniform(seed=seed)((12, 3)))
    bias = tf.Variable(tf.zeros(3))
    optimizer = tf.keras.optimizers.Adam(learning_rate)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits = x_train @ weights + bias
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y_train, logits))
            loss += weight_decay * tf.reduce_sum(weights**2)
        optimizer.apply_gradients(zip(tape.gradient(loss, [weights, bias]), [weights, bias]))

    for _ in range(steps):
        step()
    kernel = weights.numpy() / std[:, None]
    expected = kernel.astype(np.float32), (bias.numpy() - mean @ kernel).astype(np.float32)

    actual = fit_logistic(features, labels, 3, steps, learning_rate, weight_decay, seed)
    np.testing.assert_array_equal(actual[0], expected[0])
    np.testing.assert_array_equal(actual[1], expected[1])
