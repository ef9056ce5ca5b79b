"""Tests for the in-graph first decode (job/decode.py, as job.data uses it): PIL's pixels, and what it leaves
to the per-file PIL path (other formats, CMYK, other sizes, unreadable bytes, I/O errors)."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import job.data as job_data
from job.data import Dataset, load_dataset
from job.errors import JobError
from tests.unit.test_data import FISH, SIZE, decode_rgb, grayscale_members, members, modified_zip


@pytest.fixture(scope="module")
def pil_data(synth_zip: Path) -> Dataset:
    """The synthetic set decoded by PIL alone (a split below IN_GRAPH_MIN_IMAGES)."""
    return load_dataset(synth_zip, SIZE, threads=2)


@pytest.fixture
def pil_calls(monkeypatch) -> list[bytes]:
    """Every split decoded in-graph first; the bytes each call of the per-file PIL decode got."""
    monkeypatch.setattr(job_data, "IN_GRAPH_MIN_IMAGES", 0)
    calls: list[bytes] = []
    real = job_data.decode_image

    def counted(data: bytes, size: int) -> np.ndarray:
        calls.append(data)
        return real(data, size)

    monkeypatch.setattr(job_data, "decode_image", counted)
    return calls


@pytest.mark.parametrize("source", ["synth_zip", "synth_dir"])
def test_jpegs_decode_in_graph_to_pils_pixels(request, tmp_path: Path, pil_data: Dataset, pil_calls, source):
    """Before: every image went through PIL (44 calls here). RGB and grayscale JPEGs: the same pixels, exactly."""
    path = request.getfixturevalue(source)
    assert grayscale_members(members(request.getfixturevalue("synth_zip")))  # mode L JPEGs are among them
    data = load_dataset(path, SIZE, tmp_path / "cache", threads=2)
    assert pil_calls == [] and data.skipped == []
    assert data.train.files == pil_data.train.files and data.val.files == pil_data.val.files
    np.testing.assert_array_equal(data.train.images, pil_data.train.images)
    np.testing.assert_array_equal(data.val.images, pil_data.val.images)


def test_what_the_graph_does_not_decode_goes_to_pil(tmp_path: Path, synth_zip: Path, pil_calls):
    """A PNG, a CMYK JPEG and a JPEG of another size are decoded by PIL (resized as before); bytes that do
    not decode are skipped. Before: PIL decoded all 44 images."""
    png, cmyk, large, broken = (f"train/{FISH}/images/{FISH}_{i}.JPEG" for i in range(4))

    def change(files: dict[str, bytes]) -> None:
        for name, mode, fmt, size in ((png, "RGB", "PNG", SIZE), (cmyk, "CMYK", "JPEG", SIZE),
                                      (large, "RGB", "JPEG", SIZE + 8)):
            with Image.open(io.BytesIO(files[name])) as image:
                out = io.BytesIO()
                image.convert(mode).resize((size, size)).save(out, fmt)
                files[name] = out.getvalue()
        files[broken] = b"\xff\xd8\xff not a JPEG after all"

    path = modified_zip(synth_zip, tmp_path / "d.zip", change)
    data = load_dataset(path, SIZE, tmp_path / "cache", threads=2)
    assert len(pil_calls) == 4
    assert data.skipped == [f"{path}:{job_data.ROOT_NAME}/{broken}"]
    files = members(path)
    for name in (png, cmyk, large):
        np.testing.assert_array_equal(data.train.images[data.train.files.index(name)], decode_rgb(files[name], SIZE))


def test_an_io_error_fails_the_run_naming_the_file_and_caches_nothing(tmp_path: Path, synth_zip: Path,
                                                                      pil_calls, monkeypatch):
    """The files are read on a tf.data thread: its JobError must still end the run (not be dropped as an
    image the graph could not decode, and then read again by PIL)."""
    name = f"train/{FISH}/images/{FISH}_5.JPEG"
    monkeypatch.setattr(job_data, "READ_RETRY_DELAY_S", 0.0)
    real = job_data._Tree.read

    def read(self, member: str) -> bytes:
        if member == name:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(self, member)

    monkeypatch.setattr(job_data._Tree, "read", read)
    with pytest.raises(JobError, match=rf"could not read {synth_zip}:.*{name} \(Input/output error") as caught:
        load_dataset(synth_zip, SIZE, tmp_path / "cache", threads=2)
    assert caught.value.exit_code == 2 and pil_calls == []
    assert not list((tmp_path / "cache" / "decoded").iterdir())


@pytest.mark.slow
def test_real_tiny_imagenet_jpegs_decode_to_pils_pixels(mini_zip: Path, tmp_path: Path, monkeypatch):
    """The real subset's 10,900 JPEGs (colour and grayscale, 64 px): in-graph and PIL agree on every pixel."""
    real = job_data.decode_image
    monkeypatch.setattr(job_data, "decode_image", lambda data, size: pytest.fail("the per-file path was used"))
    graph = load_dataset(mini_zip, 64, tmp_path / "graph")
    monkeypatch.setattr(job_data, "decode_image", real)
    monkeypatch.setattr(job_data, "IN_GRAPH_MIN_IMAGES", len(graph.train) + 1)  # both splits: PIL only
    pil = load_dataset(mini_zip, 64, tmp_path / "pil")
    assert graph.skipped == pil.skipped == []
    np.testing.assert_array_equal(graph.train.images, pil.train.images)
    np.testing.assert_array_equal(graph.val.images, pil.val.images)
