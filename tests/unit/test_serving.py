"""The servable SavedModel (job/serving.py): loaded as a server would, with TensorFlow alone, it decodes
encoded images in its graph as training does and predicts what the `.keras` model predicts."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from job.data import decode_image
from job.layout import RunLayout
from job.serving import (
    ANGLE,
    CLASS_NAME,
    INPUT_NAME,
    PROBABILITIES,
    SERVING_SIGNATURE,
    decode_and_resize,
    export_rotation_model,
    float32_model,
)
from models.backbone import build_backbone, load_model
from models.heads import rotation_head
from tests.conftest import CLASS_NAMES, TINY_MODEL_SIZE

ATOL = 1e-5
SEED = 7

# Runs in a fresh interpreter outside the repository, with no project module importable: what TF Serving
# and Vertex AI's prebuilt containers have.
SERVER_SCRIPT = textwrap.dedent("""
    import base64, json, sys
    import tensorflow as tf
    assert not any(name == "job" or name.startswith(("job.", "models")) for name in sys.modules)
    request = json.load(sys.stdin)
    loaded = tf.saved_model.load(request["dir"])
    signature = loaded.signatures["serving_default"]
    inputs = signature.structured_input_signature[1]
    images = [base64.b64decode(instance["b64"]) for instance in request["instances"]]
    outputs = signature(**{name: tf.constant(images) for name in inputs})
    def specs(structure):
        return {name: [spec.dtype.name, spec.shape.as_list()] for name, spec in structure.items()}

    json.dump({
        "inputs": specs(inputs),
        "outputs": specs(signature.structured_outputs),
        "probabilities": outputs["probabilities"].numpy().tolist(),
        "class_name": [name.decode() for name in outputs["class_name"].numpy()],
    }, sys.stdout)
""")


def encode(pixels: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(buffer, format=fmt)
    return buffer.getvalue()


def smooth_images(count: int, height: int, width: int, seed: int = SEED) -> np.ndarray:
    """Random but smooth uint8 images (JPEG-friendly): upsampled noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (count, 4, 4, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(c).resize((width, height), Image.Resampling.BICUBIC)) for c in coarse])


def serve_in_fresh_process(directory: Path, images: list[bytes], tmp_path: Path) -> dict:
    import base64

    request = {"dir": str(directory), "instances": [{"b64": base64.b64encode(b).decode()} for b in images]}
    result = subprocess.run(
        [sys.executable, "-c", SERVER_SCRIPT], input=json.dumps(request), capture_output=True, text=True,
        cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3", "HOME": str(tmp_path)}, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_savedmodel_serves_encoded_images_like_the_keras_model(tiny_run, tmp_path):
    layout = RunLayout(tiny_run)
    pixels = smooth_images(6, TINY_MODEL_SIZE, TINY_MODEL_SIZE)
    encoded = [encode(pixels[0], "JPEG"), encode(pixels[1], "JPEG", "L"), encode(pixels[2], "PNG"),
               encode(pixels[3], "PNG", "RGBA"), encode(pixels[4], "JPEG"), encode(pixels[5], "PNG", "P")]
    served = serve_in_fresh_process(layout.classifier_savedmodel, encoded, tmp_path)

    assert served["inputs"] == {INPUT_NAME: ["string", [None]]}
    assert served["outputs"] == {PROBABILITIES: ["float32", [None, 2]], CLASS_NAME: ["string", [None]]}
    model = load_model(layout.classifier)
    expected = tf.nn.softmax(model(np.stack([decode_image(b, TINY_MODEL_SIZE) for b in encoded]).astype(np.float32)))
    np.testing.assert_allclose(served["probabilities"], expected.numpy(), atol=ATOL)
    assert served["class_name"] == [CLASS_NAMES[k] for k in np.argmax(expected, -1)]
    assert len(set(served["class_name"])) == 2, "the tiny model should not predict one class for everything"


@pytest.mark.parametrize(("height", "width", "fmt", "mode"), [
    (64, 64, "JPEG", None), (50, 77, "PNG", None), (20, 13, "JPEG", "L"), (90, 40, "PNG", "P"),
    (33, 31, "PNG", "RGBA"), (120, 200, "PNG", None),
])
def test_in_graph_decoding_matches_training_decoding(height, width, fmt, mode):
    """Other sizes are resized in the graph as PIL resizes training data: within one grey level."""
    data = encode(smooth_images(1, height, width)[0], fmt, mode)
    graph = decode_and_resize(tf.constant(data), TINY_MODEL_SIZE).numpy().astype(int)
    training = decode_image(data, TINY_MODEL_SIZE).astype(int)
    assert graph.shape == training.shape == (TINY_MODEL_SIZE, TINY_MODEL_SIZE, 3)
    assert np.abs(graph - training).max() <= 1


def test_rotation_savedmodel_gives_angles(tmp_path):
    keras.utils.set_random_seed(0)
    backbone = build_backbone(TINY_MODEL_SIZE, alpha=0.35, stem_stride=1)
    pixels = keras.Input((TINY_MODEL_SIZE, TINY_MODEL_SIZE, 3), name="pixels")
    model = keras.Model(pixels, rotation_head(backbone.output_shape[-1])(backbone(pixels)), name="rotation_model")
    layout = RunLayout(tmp_path)
    layout.export.mkdir()
    model.save(layout.rotation_model)
    export_rotation_model(layout.rotation_model, layout.rotation_savedmodel)

    images = smooth_images(3, TINY_MODEL_SIZE, TINY_MODEL_SIZE)
    outputs = tf.saved_model.load(str(layout.rotation_savedmodel)).signatures[SERVING_SIGNATURE](
        **{INPUT_NAME: tf.constant([encode(image, "PNG") for image in images])})
    expected = tf.nn.softmax(model(images.astype(np.float32))).numpy()
    np.testing.assert_allclose(outputs[PROBABILITIES].numpy(), expected, atol=ATOL)
    np.testing.assert_array_equal(outputs[ANGLE].numpy(), 90 * np.argmax(expected, -1))
    assert not list(tmp_path.rglob("tmp-*")), "the staging directory is renamed away"


def test_mixed_precision_model_is_served_in_float32(tmp_path):
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        backbone = build_backbone(TINY_MODEL_SIZE, alpha=0.35, stem_stride=1)
        pixels = keras.Input((TINY_MODEL_SIZE, TINY_MODEL_SIZE, 3), name="pixels")
        model = keras.Model(pixels, rotation_head(backbone.output_shape[-1])(backbone(pixels)))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    model.save(tmp_path / "mixed.keras")
    export_rotation_model(tmp_path / "mixed.keras", tmp_path / "served")

    images = smooth_images(2, TINY_MODEL_SIZE, TINY_MODEL_SIZE)
    outputs = tf.saved_model.load(str(tmp_path / "served")).signatures[SERVING_SIGNATURE](
        **{INPUT_NAME: tf.constant([encode(image, "PNG") for image in images])})
    reference = float32_model(load_model(tmp_path / "mixed.keras"))
    assert reference.get_layer("backbone").get_layer("to_unit_range").compute_dtype == "float32"
    expected = tf.nn.softmax(reference(images.astype(np.float32))).numpy()
    np.testing.assert_allclose(outputs[PROBABILITIES].numpy(), expected, atol=ATOL)
