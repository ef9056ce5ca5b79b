"""Small evaluators of a backbone: batched prediction, frozen features, logistic-regression probe (on val, or
cross-validated on the train labels alone), k-NN."""

from __future__ import annotations

import functools
import weakref

import keras
import numpy as np
import tensorflow as tf

from job.pipelines import eval_batches

EVAL_BATCH = 256
CV_FOLDS = 4  # folds of the probes cross-validated on the train labels (the "auto" transfer cut, the depth probe)
_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _infer(model, x):
    return model(tf.cast(x, tf.float32), training=False)


def _inference_fn(model, example: np.ndarray):
    """The model's inference function for batches like `example`, of any size: traced once per model.

    Its signature leaves the batch dimension open, so the last, smaller batch does not trace it again (shapes
    alone traced it twice: reduce_retracing relaxes a shape only once it has seen two). Each model has its own
    function object (a partial, not one lambda's code shared by every model, which TensorFlow's retracing
    count would add up across models).
    """
    functions = _compiled.setdefault(model, {})
    key = (example.dtype.str, example.shape[1:])
    if key not in functions:
        spec = tf.TensorSpec([None, *example.shape[1:]], tf.as_dtype(example.dtype))
        functions[key] = tf.function(functools.partial(_infer, model), input_signature=[spec])
    return functions[key]


def predict(model, images: np.ndarray, rotations: bool = False, batch_size: int = EVAL_BATCH):
    """Run `model` in inference mode over uint8 images; returns outputs (and rotation labels if asked).

    With `rotations=True` each batch holds all four rotations of its images (block k = k*90°).
    """
    outputs, angles = [], []
    labels = np.zeros(len(images), np.int32)
    for x, _, angle in eval_batches(images, labels, batch_size, rotations):
        result = _inference_fn(model, x)(x)
        outputs.append(tf.nest.map_structure(lambda t: t.numpy(), result))
        angles.append(angle)
    merged = tf.nest.map_structure(lambda *parts: np.concatenate(parts), *outputs)
    return (merged, np.concatenate(angles)) if rotations else merged


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=-1) == labels)) if len(labels) else 0.0


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean softmax cross-entropy of integer labels (the training loss, on held-out images)."""
    if not len(labels):
        return 0.0
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return float(-np.mean(log_probs[np.arange(len(labels)), labels]))


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> list[list[int]]:
    """Rows: true class, columns: predicted class."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix.tolist()


def fit_logistic(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    steps: int,
    learning_rate: float,
    weight_decay: float,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression on standardised features (full-batch Adam).

    Returns (kernel, bias) acting on the raw features: logits = features @ kernel + bias.
    """
    mean, std = features.mean(0), features.std(0) + 1e-6
    x_train = tf.constant((features - mean) / std, tf.float32)
    y_train = tf.constant(labels, tf.int32)
    init = tf.keras.initializers.GlorotUniform(seed=seed)
    weights = tf.Variable(init((x_train.shape[1], num_classes)))
    bias = tf.Variable(tf.zeros(num_classes))
    optimizer = tf.keras.optimizers.Adam(learning_rate)
    optimizer.build([weights, bias])  # its variables exist before the loop is traced
    # All the steps in one call, each step's ops as before: a call per step cost ~1 ms of Python and dispatch.
    # A partial: each fit traces its own function, and TensorFlow would count one code object's traces as
    # retracing (see _inference_fn).
    tf.function(functools.partial(_fit_steps, x_train, y_train, weights, bias, optimizer, steps, weight_decay))()
    kernel = weights.numpy() / std[:, None]
    return kernel.astype(np.float32), (bias.numpy() - mean @ kernel).astype(np.float32)


def _fit_steps(x_train: tf.Tensor, y_train: tf.Tensor, weights: tf.Variable, bias: tf.Variable,
               optimizer: keras.optimizers.Optimizer, steps: int, weight_decay: float) -> None:
    """`steps` full-batch steps of weight-decayed logistic regression (traced: a tf.range loop)."""
    for _ in tf.range(steps):
        with tf.GradientTape() as tape:
            logits = x_train @ weights + bias
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y_train, logits))
            loss += weight_decay * tf.reduce_sum(weights**2)
        optimizer.apply_gradients(zip(tape.gradient(loss, [weights, bias]), [weights, bias]))


def linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    num_classes: int,
    steps: int,
    learning_rate: float,
    weight_decay: float,
    seed: int = 0,
) -> float:
    """Val accuracy of logistic regression fitted on frozen train features (`fit_logistic`)."""
    kernel, bias = fit_logistic(train_features, train_labels, num_classes, steps, learning_rate, weight_decay, seed)
    return accuracy(val_features @ kernel + bias, val_labels)


def fold_ids(count: int, folds: int, seed: int) -> np.ndarray:
    """Each of `count` examples' fold, 0 to folds - 1, in an order shuffled by `seed` (fold sizes differ by at
    most one)."""
    return np.random.default_rng(seed).permutation(count) % folds


def cross_validated_accuracy(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    folds: np.ndarray,
    steps: int,
    learning_rate: float,
    weight_decay: float,
    seed: int = 0,
) -> float:
    """Accuracy of `fit_logistic` over the folds of `fold_ids`: each fold scored by a probe fitted on the others.

    It reads the train labels alone, so it can choose a layer without touching val, and it scores every train
    example (nine times the 100 fish/duck val images).
    """
    correct = 0
    for fold in np.unique(folds):
        train, held = folds != fold, folds == fold
        kernel, bias = fit_logistic(features[train], labels[train], num_classes, steps, learning_rate, weight_decay,
                                    seed)
        correct += int(np.sum(np.argmax(features[held] @ kernel + bias, -1) == labels[held]))
    return correct / len(labels)


def capped_knn_k(k: int, train_count: int) -> int:
    """k-NN's k, kept below the number of training images (at or above it, every val image's neighbours would
    be the whole training set)."""
    return max(1, min(k, train_count - 1))


def knn_accuracy(
    train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray, val_labels: np.ndarray, k: int
) -> float:
    """Cosine k-NN: each val image takes the class with the largest summed similarity among its k neighbours."""
    train = train_features / (np.linalg.norm(train_features, axis=1, keepdims=True) + 1e-12)
    val = val_features / (np.linalg.norm(val_features, axis=1, keepdims=True) + 1e-12)
    similarity = val @ train.T
    k = min(k, len(train_labels))
    neighbours = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    votes = np.zeros((len(val_labels), num_classes))
    rows = np.repeat(np.arange(len(val_labels)), k)
    np.add.at(votes, (rows, train_labels[neighbours].ravel()), np.take_along_axis(similarity, neighbours, 1).ravel())
    return float(np.mean(votes.argmax(1) == val_labels))


def colour_histograms(images: np.ndarray, bins: int) -> np.ndarray:
    """Each image's joint RGB histogram (bins**3 cells, summing to 1): a feature with no network at all.

    The downstream baseline a learned representation has to beat to show it learned more than colour.
    """
    features = np.empty((len(images), bins**3), np.float32)
    for begin in range(0, len(images), EVAL_BATCH):
        cells = np.asarray(images[begin : begin + EVAL_BATCH]).astype(np.int32) * bins // 256
        codes = (cells[..., 0] * bins + cells[..., 1]) * bins + cells[..., 2]
        for i, code in enumerate(codes.reshape(len(codes), -1)):
            features[begin + i] = np.bincount(code, minlength=bins**3) / code.size
    return features
