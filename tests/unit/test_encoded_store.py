"""Tests for `data.store = "encoded"`: the train images held as encoded bytes (job.data.encoded_train_images,
job.pipelines.EncodedStore) give exactly the decoded store's pixels and batches; the bytes are cached once."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import job.data as job_data
import job.decode as job_decode
from job.config import DataConfig
from job.data import Dataset, encoded_train_images, load_dataset
from job.pipelines import EncodedStore, ImageStore, pack_rgbx, plan_epoch, train_dataset
from job.task import train_store
from tests.unit.test_data import FISH, SIZE, grayscale_members, members, modified_zip

PNG_MAGIC = b"\x89PNG"
SEED, EPOCH, BATCH, PADDING = 3, 2, 8, 4


@pytest.fixture(scope="module")
def cached(synth_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """The synthetic set (RGB and grayscale JPEGs) read through a decode cache."""
    return load_dataset(synth_zip, SIZE, tmp_path_factory.mktemp("cache"), threads=2)


def every_image(store: ImageStore | EncodedStore) -> np.ndarray:
    return store.gather(tf.range(store.shape[0])).numpy()


def test_batches_are_bit_equal_to_the_decoded_stores(cached: Dataset):
    """The pretext's batches (gather, augmentation, four rotations) for the same seed, epoch and steps."""
    assert grayscale_members(members(Path(cached.source)))  # mode L JPEGs are among them
    plan = plan_epoch(len(cached.train), BATCH, SEED, EPOCH)
    encoded = EncodedStore(encoded_train_images(cached, threads=2), SIZE)
    batches = [list(train_dataset(store, cached.train.labels, plan, seed=SEED, epoch=EPOCH, start_step=1,
                                  padding=PADDING, rotations=True).as_numpy_iterator())
               for store in (ImageStore(cached.train.images), encoded)]
    assert len(batches[0]) == len(batches[1]) == plan.steps - 1
    for decoded, from_bytes in zip(*batches, strict=True):
        assert decoded.keys() == from_bytes.keys()
        for key in decoded:
            np.testing.assert_array_equal(from_bytes[key], decoded[key])


def test_png_cmyk_and_other_sizes_are_stored_as_pngs_of_their_pixels(tmp_path: Path, synth_zip: Path):
    """What the in-graph JPEG decode cannot give exactly is held as a PNG of the decoded pixels: every image
    round-trips. The JPEGs are held as their own bytes."""
    png, cmyk, large, progressive = (f"train/{FISH}/images/{FISH}_{i}.JPEG" for i in range(4))

    def change(files: dict[str, bytes]) -> None:
        for name, mode, fmt, size in ((png, "RGB", "PNG", SIZE), (cmyk, "CMYK", "JPEG", SIZE),
                                      (large, "RGB", "JPEG", SIZE + 8), (progressive, "RGB", "JPEG", SIZE)):
            with Image.open(io.BytesIO(files[name])) as image:
                out = io.BytesIO()
                image.convert(mode).resize((size, size)).save(out, fmt, progressive=name == progressive)
                files[name] = out.getvalue()

    path = modified_zip(synth_zip, tmp_path / "d.zip", change)
    data = load_dataset(path, SIZE, tmp_path / "cache", threads=2)
    encoded = encoded_train_images(data, threads=2)
    assert len(encoded) == len(data.train)
    sources = members(path)
    for i, name in enumerate(data.train.files):
        if name in (png, cmyk, large):
            assert encoded[i].startswith(PNG_MAGIC), name
        else:
            assert encoded[i] == sources[name], name
    np.testing.assert_array_equal(every_image(EncodedStore(encoded, SIZE)), pack_rgbx(data.train.images))


def test_encoded_bytes_are_cached_once_and_rebuilt_when_torn(tmp_path: Path, synth_zip: Path, monkeypatch):
    data = load_dataset(synth_zip, SIZE, tmp_path / "cache", threads=2)
    first = encoded_train_images(data, threads=2)
    offsets = data.cache / job_data.ENCODED_OFFSETS.format(split="train")
    assert offsets.is_file() and not list(data.cache.glob(f"*{job_data.PARTIAL_MARKER}*"))

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(job_decode, "exact_jpegs", no_encoding)
    again = encoded_train_images(load_dataset(synth_zip, SIZE, tmp_path / "cache"))  # a later run
    assert isinstance(again.data, np.memmap) and again.data.tobytes() == first.data.tobytes()
    monkeypatch.undo()
    np.save(offsets, np.load(offsets)[:-1])  # torn: the offsets no longer describe the split
    rebuilt = encoded_train_images(load_dataset(synth_zip, SIZE, tmp_path / "cache"), threads=2)
    np.testing.assert_array_equal(rebuilt.offsets, first.offsets)


def test_without_a_cache_the_bytes_stay_in_memory(cached: Dataset, synth_zip: Path):
    data = load_dataset(synth_zip, SIZE, threads=2)
    assert data.cache is None
    encoded = encoded_train_images(data, threads=2)
    np.testing.assert_array_equal(every_image(EncodedStore(encoded, SIZE)), pack_rgbx(data.train.images))


def test_the_pretext_store_follows_data_store(cached: Dataset):
    decoded = train_store(cached, DataConfig(image_size=SIZE))
    encoded = train_store(cached, DataConfig(image_size=SIZE, store="encoded", decode_threads=2))
    assert isinstance(decoded, ImageStore) and isinstance(encoded, EncodedStore)
    assert encoded.variable.dtype == tf.string and encoded.shape == decoded.shape
    np.testing.assert_array_equal(every_image(encoded), every_image(decoded))
