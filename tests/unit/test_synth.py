"""Tests for job.synth: layout, determinism, grayscale JPEGs and crude learnability cues."""

from __future__ import annotations

import io
import os
import re
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from job.synth import ROOT_NAME, SynthSummary, make_synthetic_dataset

SMALL = {"classes": 4, "per_class": 6, "val_per_class": 3, "test_images": 4, "image_size": 32}
FISH, DUCK = "n01443537", "n01855672"


def zip_files(path: Path) -> dict[str, bytes]:
    """Regular-file members of a zip, keyed by name relative to the dataset root."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert all(name.startswith(f"{ROOT_NAME}/") for name in names)
        return {name[len(ROOT_NAME) + 1:]: archive.read(name) for name in names if not name.endswith("/")}


def dir_files(path: Path) -> dict[str, bytes]:
    """Files under `path/tiny-imagenet-200`, keyed by relative posix path."""
    assert [p.name for p in path.iterdir()] == [ROOT_NAME]
    root = path / ROOT_NAME
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    image.load()
    return image


def check_layout(files: dict[str, bytes], summary: SynthSummary, image_size: int) -> None:
    """Assert the exact Tiny ImageNet layout and that it agrees with the summary."""
    wnids = files["wnids.txt"].decode().splitlines()
    assert tuple(wnids) == summary.wnids
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    words = dict(line.split("\t") for line in files["words.txt"].decode().splitlines())
    assert set(wnids) <= set(words)
    assert len(words) > len(wnids)  # unrelated synsets too, like the real file

    patterns = [
        r"wnids\.txt", r"words\.txt", r"val/val_annotations\.txt", r"val/images/val_\d+\.JPEG",
        r"test/images/test_\d+\.JPEG", r"train/(n\d{8})/images/\1_\d+\.JPEG", r"train/(n\d{8})/\1_boxes\.txt",
    ]
    for name in files:
        assert any(re.fullmatch(p, name) for p in patterns), name

    train = [n for n in files if n.startswith("train/") and n.endswith(".JPEG")]
    val = [n for n in files if n.startswith("val/images/")]
    test = [n for n in files if n.startswith("test/images/")]
    assert (len(train), len(val), len(test)) == (summary.train_images, summary.val_images, summary.test_images)
    assert {n.split("/")[1] for n in train} == set(wnids)
    assert sorted(test) == sorted(f"test/images/test_{k}.JPEG" for k in range(summary.test_images))

    def check_box(values: list[str]) -> None:
        x0, y0, x1, y1 = map(int, values)
        assert 0 <= x0 < x1 <= image_size - 1 and 0 <= y0 < y1 <= image_size - 1

    for wnid in wnids:
        lines = files[f"train/{wnid}/{wnid}_boxes.txt"].decode().splitlines()
        images = {n.rsplit("/", 1)[1] for n in train if n.startswith(f"train/{wnid}/")}
        assert {line.split("\t")[0] for line in lines} == images
        for line in lines:
            fields = line.split("\t")
            assert len(fields) == 5
            check_box(fields[1:])

    annotations = files["val/val_annotations.txt"].decode().splitlines()
    assert len(annotations) == summary.val_images
    for line in annotations:
        name, wnid, *box = line.split("\t")
        assert f"val/images/{name}" in files and wnid in wnids
        check_box(box)

    for name in train + val + test:
        assert decode(files[name]).size == (image_size, image_size)


def test_zip_layout(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "tiny.zip"
    summary = make_synthetic_dataset(out, **SMALL, downstream_per_class=9)
    assert summary.path == out and out.is_file()
    assert list(out.parent.iterdir()) == [out]  # no temp file left behind
    assert summary.wnids[:2] == (FISH, DUCK) and len(summary.wnids) == 4
    assert summary.train_images == 2 * 9 + 2 * 6
    assert summary.val_images == 4 * 3 and summary.test_images == 4
    check_layout(zip_files(out), summary, image_size=32)
    val_wnids = [line.split("\t")[1] for line in zip_files(out)["val/val_annotations.txt"].decode().splitlines()]
    assert val_wnids != sorted(val_wnids)  # classes interleaved


def test_directory_layout_matches_zip(tmp_path: Path) -> None:
    summary = make_synthetic_dataset(tmp_path / "data", **SMALL)
    assert summary.path == tmp_path / "data"
    files = dir_files(tmp_path / "data")
    check_layout(files, summary, image_size=32)
    make_synthetic_dataset(tmp_path / "same.zip", **SMALL)
    assert files == zip_files(tmp_path / "same.zip")
    with pytest.raises(FileExistsError):
        make_synthetic_dataset(tmp_path / "data", **SMALL)


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path / "a.zip", **SMALL, seed=3)
    make_synthetic_dataset(tmp_path / "b.zip", **SMALL, seed=3)
    make_synthetic_dataset(tmp_path / "c.zip", **SMALL, seed=4)
    a, b, c = (zip_files(tmp_path / f"{n}.zip") for n in "abc")
    assert a == b
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    assert a.keys() == c.keys()
    differing = [n for n in a if n.endswith(".JPEG") and a[n] != c[n]]
    assert len(differing) > len(a) // 2


def test_images_do_not_depend_on_other_counts(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path / "a.zip", **SMALL, grayscale_fraction=0.0)
    make_synthetic_dataset(tmp_path / "b.zip", **{**SMALL, "per_class": 8, "test_images": 1},
                           grayscale_fraction=0.0)
    a, b = zip_files(tmp_path / "a.zip"), zip_files(tmp_path / "b.zip")
    shared = [n for n in a if n.startswith("train/") and n.endswith(".JPEG")]
    assert shared and all(a[n] == b[n] for n in shared)


def test_grayscale_jpegs(tmp_path: Path) -> None:
    summary = make_synthetic_dataset(tmp_path / "g.zip", **SMALL, grayscale_fraction=0.1)
    files = zip_files(tmp_path / "g.zip")
    modes = [decode(data).mode for name, data in files.items() if name.endswith(".JPEG")]
    assert set(modes) == {"RGB", "L"}
    assert modes.count("L") == summary.grayscale_images == round(0.1 * len(modes))

    tiny = make_synthetic_dataset(tmp_path / "t.zip", **SMALL)  # 40 images * 2% rounds to 1
    assert tiny.grayscale_images == 1
    none = make_synthetic_dataset(tmp_path / "n.zip", **SMALL, grayscale_fraction=0.0)
    assert none.grayscale_images == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"classes": 1}, {"classes": 0}, {"image_size": 4}, {"grayscale_fraction": 1.5},
     {"downstream_wnids": (FISH, FISH)}, {"per_class": -1}],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_synthetic_dataset(tmp_path / "x.zip", **{**SMALL, **kwargs})
    assert not (tmp_path / "x.zip").exists()


def test_two_classes_and_image_size(tmp_path: Path) -> None:
    summary = make_synthetic_dataset(tmp_path / "two.zip", classes=2, per_class=2, val_per_class=1,
                                     test_images=0, image_size=48)
    assert summary.wnids == (FISH, DUCK)
    files = zip_files(tmp_path / "two.zip")
    assert decode(files[f"train/{FISH}/images/{FISH}_0.JPEG"]).size == (48, 48)


def test_learnability_cues(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path / "l.zip", classes=3, per_class=12, val_per_class=0, test_images=0,
                           image_size=32, grayscale_fraction=0.0)
    files = zip_files(tmp_path / "l.zip")

    def pixels(wnid: str) -> np.ndarray:
        names = [n for n in files if n.startswith(f"train/{wnid}/images/")]
        return np.stack([np.asarray(decode(files[n]), dtype=np.float32) for n in names])

    everything = np.concatenate([pixels(w) for w in files["wnids.txt"].decode().split()])
    quarter = everything.shape[1] // 4
    top, bottom = everything[:, :quarter].mean(axis=(1, 2, 3)), everything[:, -quarter:].mean(axis=(1, 2, 3))
    assert (top > bottom).all()
    assert top.mean() > bottom.mean() + 50

    def object_colour(wnid: str) -> np.ndarray:
        """Mean colour inside the annotated object boxes."""
        means = []
        for line in files[f"train/{wnid}/{wnid}_boxes.txt"].decode().splitlines():
            name, x0, y0, x1, y1 = line.split("\t")
            image = np.asarray(decode(files[f"train/{wnid}/images/{name}"]), dtype=np.float32)
            means.append(image[int(y0):int(y1) + 1, int(x0):int(x1) + 1].mean(axis=(0, 1)))
        return np.mean(means, axis=0)

    fish, duck = object_colour(FISH), object_colour(DUCK)
    assert np.abs(fish - duck).max() > 30
    assert fish[0] - fish[2] > duck[0] - duck[2] + 30  # fish are orange (red >> blue), ducks white/grey


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_zip_and_its_entries_are_readable_by_everyone(tmp_path: Path, umask_022) -> None:
    """The zip is 0644 and its entries unzip as 0644 files in 0755 folders (they were 0600, folders without x:
    a non-root user could not read an unzipped copy)."""
    path = tmp_path / "s.zip"
    make_synthetic_dataset(path, **SMALL)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    with zipfile.ZipFile(path) as archive:
        modes = {info.filename: info.external_attr >> 16 for info in archive.infolist()}
    assert modes[f"{ROOT_NAME}/"] == stat.S_IFDIR | 0o755
    assert modes[f"{ROOT_NAME}/wnids.txt"] == stat.S_IFREG | 0o644
    assert {stat.S_IMODE(m) for m in modes.values()} == {0o644, 0o755}


def test_directory_tree_is_readable_by_everyone(tmp_path: Path, umask_022) -> None:
    make_synthetic_dataset(tmp_path / "data", **SMALL)
    root = tmp_path / "data" / ROOT_NAME
    paths = [root, *root.rglob("*")]
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_dir()} == {0o755}
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_file()} == {0o644}


def test_an_existing_zip_is_replaced_only_with_force(tmp_path: Path) -> None:
    path = tmp_path / "s.zip"
    path.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="--force"):
        make_synthetic_dataset(path, **SMALL)
    assert path.read_bytes() == b"mine"
    make_synthetic_dataset(path, **SMALL, force=True)
    assert zipfile.is_zipfile(path)


def test_an_existing_directory_tree_is_replaced_only_with_force(tmp_path: Path) -> None:
    root = tmp_path / "data" / ROOT_NAME
    root.mkdir(parents=True)
    (root / "mine.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_synthetic_dataset(tmp_path / "data", **SMALL)
    summary = make_synthetic_dataset(tmp_path / "data", **SMALL, force=True)
    assert not (root / "mine.txt").exists()
    check_layout(dir_files(tmp_path / "data"), summary, image_size=32)


@pytest.mark.parametrize("name", ["per_class", "downstream_per_class"])
def test_a_class_without_train_images_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be >= 1"):
        make_synthetic_dataset(tmp_path / "x.zip", **{**SMALL, name: 0})
    assert not (tmp_path / "x.zip").exists()
