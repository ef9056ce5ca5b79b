"""`job predict`: classify images with a trained model (a run directory, a `.keras` file or a SavedModel).

Images are decoded exactly as training data is (`job.data.decode_image`: any format and mode PIL reads,
converted to RGB and resized bilinearly to the model's image size), in threads, a batch ahead of the model.
Unreadable files are logged, skipped and returned to the caller, as in training.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from job import console
from job.data import UNREADABLE_ERRORS, decode_image, unreadable_reason
from job.errors import JobError
from job.layout import RunLayout

log = logging.getLogger(__name__)

PREDICT_BATCH = 256
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ZIP_SUFFIX = ".zip"
KERAS_SUFFIX = ".keras"
SAVED_MODEL_FILE = "saved_model.pb"
CONFIG_FILE = "config.json"
GCS_SCHEME = "gs://"
PATH_COLUMN, CLASS_COLUMN, PROBABILITY_PREFIX = "path", "class", "prob_"
MODEL_HINT = "pass a run directory (holding config.json and model/classifier.keras), a .keras file or a SavedModel"


@dataclass
class Predictor:
    """A loaded model: uint8 pixels [B, S, S, 3] → class probabilities [B, K], and what the classes are."""

    probabilities: Callable[[np.ndarray], np.ndarray]
    image_size: int
    class_names: list[str]
    source: str
    keep: object = None  # what `probabilities` needs alive (a loaded SavedModel)


@dataclass(frozen=True)
class ImageFile:
    """One image to classify: the name shown in the output and how to read its bytes."""

    name: str
    read: Callable[[], bytes]


@dataclass(frozen=True)
class Prediction:
    name: str
    class_name: str
    probabilities: np.ndarray


# -- the model ---------------------------------------------------------------------------------------
def load_predictor(model: str, cache_dir: Path) -> Predictor:
    """Load `model`: a run directory, a `.keras` classifier or a SavedModel directory (local or gs://)."""
    if model.startswith(GCS_SCHEME):
        return _load_gcs(model.rstrip("/"), cache_dir)
    if "://" in model:
        raise JobError(f"--model {model} uses an unsupported scheme: {MODEL_HINT}, as a local path or gs:// URI.")
    path = Path(model).expanduser()
    if not path.exists():
        raise JobError(f"--model {path} does not exist: {MODEL_HINT}.")
    if (path / CONFIG_FILE).is_file():
        layout = RunLayout(path)
        if not layout.classifier.is_file():
            raise JobError(f"{layout.classifier} is missing: run `python -m job finetune` on {path} first.")
        return _load_keras(layout.classifier, _run_config(layout.config), str(path))
    if path.suffix == KERAS_SUFFIX and path.is_file():
        config = path.parent.parent / CONFIG_FILE  # <run>/model/classifier.keras
        return _load_keras(path, _run_config(config) if config.is_file() else None, str(path))
    if (path / SAVED_MODEL_FILE).is_file():
        return _load_savedmodel(path, str(path))
    raise JobError(f"--model {path} is not a model: {MODEL_HINT}.")


def _load_gcs(uri: str, cache_dir: Path) -> Predictor:
    from job.fetch import fetch_dataset
    from job.gcs import gcs_object_exists

    if uri.endswith(KERAS_SUFFIX):
        if not gcs_object_exists(uri):
            raise JobError(f"--model {uri} does not exist: {MODEL_HINT}.")
        config_uri = f"{uri.rsplit('/', 2)[0]}/{CONFIG_FILE}"
        config = _run_config(fetch_dataset(config_uri, cache_dir)) if gcs_object_exists(config_uri) else None
        return _load_keras(fetch_dataset(uri, cache_dir), config, uri)
    if gcs_object_exists(f"{uri}/{CONFIG_FILE}"):
        classifier = f"{uri}/{RunLayout(Path()).classifier.as_posix()}"
        if not gcs_object_exists(classifier):
            raise JobError(f"{classifier} is missing: run `python -m job finetune` with --output {uri} first.")
        config = _run_config(fetch_dataset(f"{uri}/{CONFIG_FILE}", cache_dir))
        return _load_keras(fetch_dataset(classifier, cache_dir), config, uri)
    if gcs_object_exists(f"{uri}/{SAVED_MODEL_FILE}"):
        return _load_savedmodel(fetch_dataset(f"{uri}/", cache_dir), uri)
    raise JobError(f"--model {uri} holds no model (or does not exist): {MODEL_HINT}.")


def _run_config(path: Path) -> dict:
    """image_size and class names from a run's config.json."""
    try:
        data = json.loads(Path(path).read_text())["data"]
        return {"image_size": int(data["image_size"]), "class_names": [str(n) for n in data["downstream_names"]]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise JobError(f"{path} is not a run's config.json ({err}): {MODEL_HINT}.") from err


def _load_keras(path: Path, config: dict | None, source: str) -> Predictor:
    console.import_tensorflow()
    import tensorflow as tf

    from job.serving import float32_model
    from models.backbone import load_model

    try:
        model = float32_model(load_model(path))
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise JobError(f"cannot load {source} as a Keras model ({err}): {MODEL_HINT}.") from err
    size, classes = int(model.input_shape[1]), int(model.output_shape[-1])
    if config is None:
        log.warning("No config.json beside %s: classes are named by their index", source)
        names = [str(k) for k in range(classes)]
    else:
        names = config["class_names"]
        if config["image_size"] != size or len(names) != classes:
            raise JobError(f"{source}: the model takes {size} px and gives {classes} classes, its config.json says "
                           f"{config['image_size']} px and {names}: pass the run directory the model came from.")
    infer = tf.function(lambda x: tf.nn.softmax(tf.cast(model(tf.cast(x, tf.float32), training=False), tf.float32)),
                        reduce_retracing=True)
    return Predictor(lambda pixels: infer(pixels).numpy(), size, names, source)


def _load_savedmodel(path: Path, source: str) -> Predictor:
    console.import_tensorflow()
    import tensorflow as tf

    from job.serving import PIXELS_SIGNATURE, PROBABILITIES

    loaded = tf.saved_model.load(str(path))
    if PIXELS_SIGNATURE not in loaded.signatures or not hasattr(loaded, "labels"):
        raise JobError(f"{source} is a SavedModel but not one this job exported (no '{PIXELS_SIGNATURE}' "
                       f"signature): {MODEL_HINT}.")
    labels = [v.decode() if isinstance(v, bytes) else str(v) for v in loaded.labels.numpy().tolist()]
    signature = loaded.signatures[PIXELS_SIGNATURE]

    def probabilities(pixels: np.ndarray) -> np.ndarray:
        return signature(pixels=tf.constant(pixels))[PROBABILITIES].numpy()

    return Predictor(probabilities, int(loaded.image_size.numpy()), labels, source, keep=loaded)


# -- the images --------------------------------------------------------------------------------------
def find_images(inputs: Sequence[str], cache_dir: Path) -> list[ImageFile]:
    """Every image named by `inputs`: files (any name), folders (recursively) and zips (image members, by
    suffix), local or gs:// (an object or a prefix), in the order given, each folder or zip sorted."""
    found: list[ImageFile] = []
    for item in inputs:
        if item.startswith(GCS_SCHEME):
            from job.fetch import fetch_dataset

            local = fetch_dataset(item, cache_dir)
            found += _local_images(local, item.rstrip("/") if local.is_dir() else item)
        elif "://" in item:
            raise JobError(f"{item} uses an unsupported scheme: pass local paths or gs:// URIs.")
        else:
            path = Path(item).expanduser()
            if not path.exists():
                raise JobError(f"{path} does not exist: pass image files, folders, zips or gs:// URIs.")
            found += _local_images(path, str(path))
    if not found:
        raise JobError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {' '.join(inputs)}: pass image files, "
                       "folders, zips or gs:// URIs.")
    return found


def _local_images(path: Path, shown: str) -> list[ImageFile]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return [ImageFile(f"{shown}/{p.relative_to(path).as_posix()}", p.read_bytes) for p in files]
    if path.suffix.lower() == ZIP_SUFFIX and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = sorted(n for n in archive.namelist() if n.lower().endswith(IMAGE_SUFFIXES))
        return [ImageFile(f"{shown}:{member}", _zip_reader(path, member)) for member in members]
    return [ImageFile(shown, path.read_bytes)]


def _zip_reader(path: Path, member: str) -> Callable[[], bytes]:
    def read() -> bytes:
        with zipfile.ZipFile(path) as archive:
            return archive.read(member)

    return read


# -- predicting ---------------------------------------------------------------------------------------
def predict_images(predictor: Predictor, images: Sequence[ImageFile], skipped: list[str],
                   batch_size: int = PREDICT_BATCH, threads: int = 0) -> Iterator[Prediction]:
    """Predictions in input order; unreadable images are logged, appended to `skipped` and left out.

    The next batch is decoded (in threads) while the model runs on the current one.
    """
    size = predictor.image_size

    def decode(image: ImageFile) -> np.ndarray | None:
        try:
            return decode_image(image.read(), size)
        except (*UNREADABLE_ERRORS, KeyError, zipfile.BadZipFile) as err:
            log.warning("Skipping unreadable image %s (%s)", image.name, unreadable_reason(err))
            return None

    batches = [images[begin : begin + batch_size] for begin in range(0, len(images), batch_size)]
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:

        def submit(batch: Sequence[ImageFile]) -> list[Future]:
            return [pool.submit(decode, image) for image in batch]

        pending = submit(batches[0]) if batches else []
        for index, batch in enumerate(batches):
            current = pending
            pending = submit(batches[index + 1]) if index + 1 < len(batches) else []
            decoded = [future.result() for future in current]
            kept = [(image, pixels) for image, pixels in zip(batch, decoded) if pixels is not None]
            skipped += [image.name for image, pixels in zip(batch, decoded) if pixels is None]
            if not kept:
                continue
            probabilities = predictor.probabilities(np.stack([pixels for _, pixels in kept]))
            for (image, _), row in zip(kept, probabilities):
                yield Prediction(image.name, predictor.class_names[int(np.argmax(row))], row)


def header(class_names: Sequence[str]) -> list[str]:
    """The CSV columns: path, predicted class, then the probability of each class in model order."""
    return [PATH_COLUMN, CLASS_COLUMN, *(f"{PROBABILITY_PREFIX}{name}" for name in class_names)]


def row(prediction: Prediction, digits: int = 6) -> list[str]:
    return [prediction.name, prediction.class_name, *(f"{p:.{digits}f}" for p in prediction.probabilities)]


def run_predict(model: str, inputs: Sequence[str], write_row: Callable[[list[str]], None], cache_dir: Path,
                batch_size: int = PREDICT_BATCH) -> tuple[int, list[str]]:
    """Load the model, find and classify the images, pass the header (before the first row) and each row
    to `write_row`.

    Returns (images predicted, images skipped); a JobError when none could be read.
    """
    start = time.perf_counter()
    images = find_images(inputs, cache_dir)
    predictor = load_predictor(model, cache_dir)
    log.info("Predicting %d images with %s (%d px, classes %s)", len(images), predictor.source,
             predictor.image_size, ", ".join(predictor.class_names))
    skipped: list[str] = []
    count = 0
    for prediction in predict_images(predictor, images, skipped, batch_size):
        if not count:
            write_row(header(predictor.class_names))
        write_row(row(prediction))
        count += 1
    if not count:
        raise JobError(f"none of the {len(images)} images could be read (see the warnings above): pass images "
                       "in a format PIL reads.")
    seconds = time.perf_counter() - start
    log.info("Predicted %d images in %.1f s (%.0f images/s); skipped %d unreadable%s", count, seconds,
             count / max(seconds, 1e-9), len(skipped), f": {', '.join(skipped)}" if skipped else "")
    return count, skipped
