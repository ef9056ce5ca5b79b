"""Servable exports: a SavedModel that Vertex AI's prebuilt TensorFlow containers and TF Serving serve as is.

Its `serving_default` signature takes encoded images (a string tensor [B] named `image_bytes`: JPEG, PNG, GIF
or BMP bytes, which TF Serving's and Vertex AI's JSON `{"b64": ...}` convention delivers) and does the
preprocessing in the graph, as `job.data.decode_image` does for training data: decode with 3 channels,
resize bilinearly (antialiased, as PIL does) to the training image size when the size differs, round to
uint8. The server needs no project code. A second signature, `pixels`, takes already decoded uint8
[B, S, S, 3] images (what `job predict` feeds it after decoding with `job.data`).

Outputs: `probabilities` [B, K] (softmax over the model's logits) and the most probable label: `class_name`
[B] (string) for the classifier, `angle` [B] (int32 degrees, counter-clockwise) for the rotation model.
The loaded object also carries `image_size` and `labels` (the class names or angles, in output order).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import keras
import tensorflow as tf

from models.backbone import load_model

log = logging.getLogger(__name__)

SERVING_SIGNATURE = "serving_default"
PIXELS_SIGNATURE = "pixels"
INPUT_NAME = "image_bytes"  # the `_bytes` suffix: Vertex AI's convention for base64-encoded inputs
PROBABILITIES = "probabilities"
CLASS_NAME = "class_name"
ANGLE = "angle"
DEGREES_PER_ROTATION = 90
CHANNELS = 3
PIXEL_MAX = 255.0
JPEG_DCT = "INTEGER_ACCURATE"  # libjpeg's default, as PIL decodes (TF's own default is INTEGER_FAST)
MIXED_POLICIES = ("mixed_float16", "mixed_bfloat16")
DTYPE_POLICY, FLOAT32 = "DTypePolicy", "float32"
TEMP_PREFIX = "tmp-"  # job.sync never uploads a directory named tmp*: only the finished export goes up


def decode_and_resize(image_bytes: tf.Tensor, size: int) -> tf.Tensor:
    """One encoded image (scalar string) → RGB uint8 [size, size, 3], the graph twin of job.data.decode_image."""
    image = tf.cond(
        tf.io.is_jpeg(image_bytes),
        lambda: tf.io.decode_jpeg(image_bytes, channels=CHANNELS, dct_method=JPEG_DCT),
        lambda: tf.io.decode_image(image_bytes, channels=CHANNELS, dtype=tf.uint8, expand_animations=False),
    )
    image.set_shape([None, None, CHANNELS])

    def resized() -> tf.Tensor:
        pixels = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(pixels), 0.0, PIXEL_MAX), tf.uint8)

    same_size = tf.reduce_all(tf.equal(tf.shape(image)[:2], [size, size]))
    return tf.cond(same_size, lambda: image, resized)


class ServingModule(tf.Module):
    """A Keras model (uint8-range pixels → logits) with in-graph image decoding and labelled outputs."""

    def __init__(self, model: keras.Model, labels: list[str] | list[int], label_output: str):
        super().__init__(name="serving")
        self.model = model
        self.size = int(model.input_shape[1])
        self.label_output = label_output
        self.image_size = tf.Variable(self.size, trainable=False, name="image_size")
        self.labels = tf.Variable(labels, trainable=False, name="labels")
        pixels_spec = tf.TensorSpec([None, self.size, self.size, CHANNELS], tf.uint8, name="pixels")
        self.serve_pixels = tf.function(self._outputs, input_signature=[pixels_spec])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_NAME)])
    def serve_bytes(self, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        """Encoded images [B] → probabilities [B, K] and the most probable label [B]."""
        pixels = tf.map_fn(
            lambda encoded: decode_and_resize(encoded, self.size),
            image_bytes,
            fn_output_signature=tf.TensorSpec([self.size, self.size, CHANNELS], tf.uint8),
        )
        return self._outputs(pixels)

    def _outputs(self, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = self.model(tf.cast(pixels, tf.float32), training=False)
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
        return {PROBABILITIES: probabilities, self.label_output: tf.gather(self.labels, tf.argmax(probabilities, -1))}


def float32_model(model: keras.Model) -> keras.Model:
    """A float32 copy of a mixed-precision model (a CPU serves float16 slowly, if at all); else the model itself."""
    config = model.get_config()
    found = False

    def to_float32(node: object) -> None:
        nonlocal found
        if isinstance(node, dict):
            if node.get("class_name") == DTYPE_POLICY and node.get("config", {}).get("name") in MIXED_POLICIES:
                node["config"]["name"] = FLOAT32
                found = True
            for value in node.values():
                to_float32(value)
        elif isinstance(node, list):
            for value in node:
                to_float32(value)

    to_float32(config)
    if not found:
        return model
    copy = keras.Model.from_config(config)
    copy.set_weights(model.get_weights())
    log.info("Exporting %s in float32 (it was trained in mixed precision)", model.name)
    return copy


def export_savedmodel(model: keras.Model, directory: Path, labels: list[str] | list[int], label_output: str) -> Path:
    """Write `model` (in float32) as a servable SavedModel at `directory` (replacing it; written aside, then
    renamed)."""
    directory = Path(directory)
    module = ServingModule(float32_model(model), labels, label_output)
    staging = directory.with_name(TEMP_PREFIX + directory.name)
    shutil.rmtree(staging, ignore_errors=True)
    tf.saved_model.save(module, str(staging), signatures={
        SERVING_SIGNATURE: module.serve_bytes,
        PIXELS_SIGNATURE: module.serve_pixels,
    })
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    log.info("Exported a servable SavedModel to %s (signature %s: %s → %s, %s)",
             directory, SERVING_SIGNATURE, INPUT_NAME, PROBABILITIES, label_output)
    return directory


def export_classifier(keras_path: Path, directory: Path, class_names: list[str]) -> Path:
    """The fish-vs-duck classifier saved at `keras_path` → SavedModel with `probabilities` and `class_name`."""
    model = load_model(keras_path)
    return export_savedmodel(model, directory, list(class_names), CLASS_NAME)


def export_rotation_model(keras_path: Path, directory: Path) -> Path:
    """The rotation model saved at `keras_path` → SavedModel with `probabilities` [B, 4] and `angle` (degrees)."""
    model = load_model(keras_path)
    angles = [k * DEGREES_PER_ROTATION for k in range(int(model.output_shape[-1]))]
    return export_savedmodel(model, directory, angles, ANGLE)
