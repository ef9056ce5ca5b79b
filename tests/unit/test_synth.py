"""Tests for job.synth: layout, determinism, grayscale JPEGs, and what the data lets a model learn.

The mechanism the demo shows: which way is up is visible only in object shape (no global cue), and fish vs
duck differ in shape, not colour. Both are checked on generated images with linear probes, without training.
"""

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




# --- the mechanism: orientation only from shape, fish vs duck only from shape --------------------------------

MECHANISM = {"classes": 6, "per_class": 60, "downstream_per_class": 150, "val_per_class": 0, "test_images": 0,
             "image_size": 32, "seed": 0, "grayscale_fraction": 0.0}
GRID = 4  # the background features: mean colour outside the object's box in a GRID x GRID grid
SILHOUETTE_GRID = 8  # the shape features: share of object pixels in a finer grid
OBJECT_MAX_LUMA = 140.0  # between the dark object's and the light background's colour ranges
PROBE_STEPS, PROBE_LR, PROBE_WEIGHT_DECAY = 400, 0.5, 1e-3
ROTATION_CHANCE_MAX = 0.35  # 4-way chance is 0.25
SHAPE_ROTATION_MIN = 0.45  # the silhouette alone tells the rotation
CUE_CONTROL_MIN = 0.9  # the background probe reads a planted global cue
CUE_RAMP = 60.0  # grey levels, top to bottom, of the planted cue
COLOUR_BINS = 4  # evaluate.colour_bins' default
COLOUR_CHANCE_MAX = 0.65  # 2-way chance is 0.5
FISH_MIN_ASPECT, DUCK_MAX_ASPECT = 1.4, 1.25  # median box width / height
ASPECT_ACCURACY_MIN = 0.95

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


@pytest.fixture(scope="module")
def mechanism_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    path = tmp_path_factory.mktemp("mechanism") / "m.zip"
    make_synthetic_dataset(path, **MECHANISM)
    return zip_files(path)


def class_images(files: dict[str, bytes], wnid: str) -> tuple[np.ndarray, np.ndarray]:
    """A class's train images (uint8, in boxes.txt order) and their object boxes (x0, y0, x1, y1, inclusive)."""
    images, boxes = [], []
    for line in files[f"train/{wnid}/{wnid}_boxes.txt"].decode().splitlines():
        name, *box = line.split("\t")
        images.append(np.asarray(decode(files[f"train/{wnid}/images/{name}"]).convert("RGB")))
        boxes.append([int(v) for v in box])
    return np.stack(images), np.array(boxes)


def aspect(boxes: np.ndarray) -> np.ndarray:
    """Box width / height."""
    return (boxes[:, 2] - boxes[:, 0] + 1) / (boxes[:, 3] - boxes[:, 1] + 1)


def probe_accuracy(features: np.ndarray, labels: np.ndarray, classes: int, seed: int = 0) -> float:
    """Multinomial logistic regression (full-batch gradient descent, standardised features) trained on a
    random half of the samples; accuracy on the other half."""
    order = np.random.default_rng(seed).permutation(len(labels))
    train, val = order[: len(order) // 2], order[len(order) // 2:]
    mean, std = features[train].mean(0), features[train].std(0) + 1e-6
    x_train, x_val = (features[train] - mean) / std, (features[val] - mean) / std
    targets = np.eye(classes)[labels[train]]
    weights, bias = np.zeros((features.shape[1], classes)), np.zeros(classes)
    for _ in range(PROBE_STEPS):
        logits = x_train @ weights + bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        grad = (p / p.sum(1, keepdims=True) - targets) / len(train)
        weights -= PROBE_LR * (x_train.T @ grad + PROBE_WEIGHT_DECAY * weights)
        bias -= PROBE_LR * grad.sum(0)
    return float(np.mean(np.argmax(x_val @ weights + bias, 1) == labels[val]))


def grid_mean(values: np.ndarray, weights: np.ndarray, cells: int) -> np.ndarray:
    """Weighted mean of `values` [N, S, S, C] in each cell of a cells x cells grid → [N, cells * cells * C];
    a cell without weight takes the image's weighted mean."""
    n, size = len(values), values.shape[1]

    def cell_sums(x: np.ndarray) -> np.ndarray:
        return x.reshape(n, cells, size // cells, cells, size // cells, -1).sum(axis=(2, 4))

    totals, counts = cell_sums(values * weights[..., None]), cell_sums(weights[..., None])
    overall = totals.sum(axis=(1, 2), keepdims=True) / np.maximum(counts.sum(axis=(1, 2), keepdims=True), 1)
    return np.where(counts > 0, totals / np.maximum(counts, 1), overall).reshape(n, -1)


def test_orientation_is_in_the_shape_only(mechanism_data: dict[str, bytes]) -> None:
    """Outside the object's box, rotated images look alike at every angle (a planted sky/ground ramp would
    tell the angle there); the object's silhouette tells it."""
    wnids = mechanism_data["wnids.txt"].decode().split()
    images, boxes = (np.concatenate(parts) for parts in zip(*(class_images(mechanism_data, w) for w in wnids)))
    images = images.astype(np.float32)
    size = images.shape[1]
    rows, cols = np.arange(size)[None, :, None], np.arange(size)[None, None, :]
    inside = ((rows >= boxes[:, 1, None, None]) & (rows <= boxes[:, 3, None, None])
              & (cols >= boxes[:, 0, None, None]) & (cols <= boxes[:, 2, None, None]))
    ramp = np.linspace(CUE_RAMP / 2, -CUE_RAMP / 2, size, dtype=np.float32)[None, :, None, None]
    angles = np.random.default_rng(1).integers(4, size=len(images))

    def rotated(upright: np.ndarray) -> np.ndarray:
        return np.stack([np.rot90(image, k) for image, k in zip(upright, angles, strict=True)])

    def background_probe(upright: np.ndarray) -> float:
        background = rotated((~inside).astype(np.float32))
        return probe_accuracy(grid_mean(rotated(upright), background, GRID), angles, 4)

    assert background_probe(images) < ROTATION_CHANCE_MAX
    assert background_probe(images + ramp) > CUE_CONTROL_MIN  # the probe does find a global cue when there is one
    silhouettes = (rotated(images).mean(axis=-1) < OBJECT_MAX_LUMA).astype(np.float32)
    shape = grid_mean(silhouettes[..., None], np.ones_like(silhouettes), SILHOUETTE_GRID)
    assert probe_accuracy(shape, angles, 4) > SHAPE_ROTATION_MIN


def test_fish_and_duck_differ_in_shape_not_colour(mechanism_data: dict[str, bytes]) -> None:
    """The evaluate stage's colour-histogram features do not separate the pair; the objects' outline does."""
    from job.probes import colour_histograms

    fish, fish_boxes = class_images(mechanism_data, FISH)
    duck, duck_boxes = class_images(mechanism_data, DUCK)
    fish_aspect, duck_aspect = aspect(fish_boxes), aspect(duck_boxes)
    labels = np.repeat([0, 1], [len(fish), len(duck)])
    histograms = colour_histograms(np.concatenate([fish, duck]), COLOUR_BINS)
    assert probe_accuracy(histograms, labels, 2) < COLOUR_CHANCE_MAX

    assert np.median(fish_aspect) > FISH_MIN_ASPECT and np.median(duck_aspect) < DUCK_MAX_ASPECT
    threshold = (np.median(fish_aspect) + np.median(duck_aspect)) / 2
    said_fish = np.concatenate([fish_aspect, duck_aspect]) > threshold
    assert np.mean(said_fish == (labels == 0)) > ASPECT_ACCURACY_MIN  # long and flat: a fish
