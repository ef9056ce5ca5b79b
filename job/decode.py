"""The fast first decode: JPEG bytes → RGB uint8 [size, size, 3] in a tf.data pipeline, on every core.

The caller reads the files (a few µs each in Python, with its own retries and error handling) and hands
them over a chunk at a time; the decode itself runs in tf.data's parallel map (no Python, no GIL): about
half the CPU time a PIL decode takes per 64 px image. Its pixels are PIL's (`job.data.decode_image`):
the same libjpeg(-turbo) with the same settings, the accurate integer IDCT (PIL's default; TensorFlow's
default is the fast one) and fancy upsampling. What it does not take on is dropped from its output and
left to the caller's PIL path: other formats, CMYK JPEGs, images of another size (PIL resizes them), bytes
that do not decode.

It also decodes the encoded image store (`data.store = "encoded"`, `job.pipelines.EncodedStore`): each
image held as its source JPEG, when this decode gives its cached pixels exactly (`exact_jpegs`), else as a
lossless PNG of those pixels, and decoded a batch at a time in-graph (`decode_stored`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import tensorflow as tf

DECODE_BATCH = 256  # decoded images handed back (and written to the cache) at once
PREFETCH_BATCHES = 2
PIL_DCT = "INTEGER_ACCURATE"  # libjpeg's JDCT_ISLOW, as PIL decodes
RGB = 3
CMYK_COMPONENTS = 4  # PIL converts CMYK/YCCK with its own formula: left to it
JPEG_MAGIC = b"\xff\xd8"  # every JPEG starts with SOI; the store holds JPEGs and PNGs only


def _decode_jpeg(data: tf.Tensor) -> tf.Tensor:
    """One JPEG → RGB uint8 [H, W, 3], as PIL decodes it (see the module's docstring)."""
    return tf.io.decode_jpeg(data, channels=RGB, dct_method=PIL_DCT)


def decode_stored(data: tf.Tensor, size: int) -> tf.Tensor:
    """One image of the encoded store (a JPEG `exact_jpegs` passed, or a PNG) → RGB uint8 [size, size, 3]."""
    is_jpeg = tf.equal(tf.strings.substr(data, 0, len(JPEG_MAGIC)), JPEG_MAGIC)
    image = tf.cond(is_jpeg, lambda: _decode_jpeg(data), lambda: tf.io.decode_png(data, channels=RGB))
    return tf.ensure_shape(image, (size, size, RGB))


def exact_jpegs(data: list[bytes], pixels: np.ndarray, threads: int = 0) -> np.ndarray:
    """bool [N]: which of the encoded images `data` this module decodes to exactly `pixels` [N, H, W, 3]."""
    exact = np.zeros(len(data), bool)
    # Slices of tensors, not a generator: tf.data's generator registry kept every chunk's bytes alive (~200 MB
    # for the 100k set's 176 MB of JPEGs, encoded a chunk at a time).
    rows = tf.data.Dataset.from_tensor_slices((np.arange(len(data), dtype=np.int64), np.asarray(data, object)))
    for positions, images in _decode_rows(rows, pixels.shape[1], threads):
        exact[positions] = (images == pixels[positions]).reshape(len(positions), -1).all(axis=1)
    return exact


def decoded_batches(chunks: Iterable[tuple[np.ndarray, list[bytes]]], size: int,
                    threads: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions int64 [B], images uint8 [B, size, size, 3]) for the JPEGs of `chunks` this path decodes.

    `chunks` yields (positions, encoded bytes) pairs of equal length; it runs on a tf.data thread, so an
    exception it raises is not seen here: the caller records it and checks after the loop. `threads`: the
    decode's thread pool (0: one per core).
    """

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for positions, data in chunks:
            yield np.asarray(positions, np.int64), np.asarray(data, object)

    signature = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.string))
    rows = tf.data.Dataset.from_generator(generate, output_signature=signature).unbatch()
    yield from _decode_rows(rows, size, threads)


def _decode_rows(rows: tf.data.Dataset, size: int, threads: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions, images) batches of the (position, bytes) `rows` that are `size` px RGB or grayscale JPEGs,
    decoded in parallel, in any order; the others are dropped."""

    def decode(position: tf.Tensor, data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        shape = tf.io.extract_jpeg_shape(data)  # fails on anything but a JPEG
        usable = tf.debugging.assert_equal(
            tf.logical_and(tf.reduce_all(shape[:2] == size), shape[2] != CMYK_COMPONENTS), True,
            message="another size, or CMYK: left to PIL",
        )
        with tf.control_dependencies([usable]):
            image = _decode_jpeg(data)
        return position, tf.ensure_shape(image, (size, size, RGB))

    decoded = rows.map(decode, num_parallel_calls=threads or tf.data.AUTOTUNE, deterministic=False)
    options = tf.data.Options()
    options.deterministic = False
    if threads:
        options.threading.private_threadpool_size = threads
    dataset = decoded.ignore_errors().batch(DECODE_BATCH).prefetch(PREFETCH_BATCHES).with_options(options)
    yield from dataset.as_numpy_iterator()
