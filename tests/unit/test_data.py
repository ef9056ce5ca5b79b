"""Tests for job.data: reading Tiny ImageNet zips and directories, decoding, the cache, and input errors."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from job.data import ROOT_NAME, Dataset, load_dataset
from job.errors import JobError
from job.synth import make_synthetic_dataset
from tests.conftest import SYNTH

SIZE = SYNTH["image_size"]
CLASSES = SYNTH["classes"]
TRAIN = SYNTH["classes"] * SYNTH["per_class"]
VAL = SYNTH["classes"] * SYNTH["val_per_class"]
FISH, DUCK = "n01443537", "n01855672"


def members(path: Path) -> dict[str, bytes]:
    """Regular-file members of a dataset zip, keyed by name relative to `tiny-imagenet-200/`."""
    with zipfile.ZipFile(path) as archive:
        return {
            name[len(ROOT_NAME) + 1 :]: archive.read(name)
            for name in archive.namelist()
            if not name.endswith("/")
        }


def write_zip(path: Path, files: dict[str, bytes], root: str = f"{ROOT_NAME}/") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(f"{root}{name}", data)
    return path


def modified_zip(source: Path, target: Path, change: Callable[[dict[str, bytes]], None]) -> Path:
    """A copy of the `source` dataset zip with its files edited in place by `change`."""
    files = members(source)
    change(files)
    return write_zip(target, files)


def decode_rgb(data: bytes, size: int | None = None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image)


def grayscale_members(files: dict[str, bytes]) -> list[str]:
    found = []
    for name, data in files.items():
        if name.lower().endswith(".jpeg"):
            with Image.open(io.BytesIO(data)) as image:
                if image.mode == "L":
                    found.append(name)
    return found


def load_error(path: Path, tmp_path: Path | None = None) -> str:
    with pytest.raises(JobError) as caught:
        load_dataset(path, SIZE, cache_dir=tmp_path / "cache" if tmp_path else None, threads=2)
    assert caught.value.exit_code == 2
    return str(caught.value)


@pytest.fixture(scope="module")
def zip_data(synth_zip: Path) -> Dataset:
    return load_dataset(synth_zip, SIZE, threads=2)


@pytest.fixture(scope="module")
def zip_members(synth_zip: Path) -> dict[str, bytes]:
    return members(synth_zip)


# -- reading the layout ----------------------------------------------------------------------------
def test_zip_load_shapes_and_types(zip_data: Dataset, zip_members: dict[str, bytes]):
    wnids = zip_members["wnids.txt"].decode().split()
    assert zip_data.wnids == wnids
    assert len(zip_data.wnids) == CLASSES
    assert zip_data.wnids[:2] == [FISH, DUCK]
    assert len(zip_data.train) == TRAIN and len(zip_data.val) == VAL
    assert zip_data.skipped == []
    assert zip_data.decode_seconds > 0
    for split in (zip_data.train, zip_data.val):
        assert split.images.dtype == np.uint8
        assert split.images.shape == (len(split), SIZE, SIZE, 3)
        assert split.labels.dtype == np.int32
        assert split.labels.min() >= 0 and split.labels.max() < CLASSES
        assert split.images.std() > 1  # real pixels, not the zero-initialised buffer
    assert np.bincount(zip_data.train.labels, minlength=CLASSES).tolist() == [SYNTH["per_class"]] * CLASSES
    assert np.bincount(zip_data.val.labels, minlength=CLASSES).tolist() == [SYNTH["val_per_class"]] * CLASSES


def test_names_come_from_words_txt(zip_data: Dataset):
    assert zip_data.names[FISH] == "goldfish, Carassius auratus"
    assert zip_data.names[DUCK] == "goose"
    assert set(zip_data.names) == set(zip_data.wnids)  # unrelated synsets of words.txt are dropped


def test_train_labels_follow_directories(zip_data: Dataset):
    for name, label in zip(zip_data.train.files, zip_data.train.labels, strict=True):
        assert name.startswith(f"train/{zip_data.wnids[label]}/images/")


def test_pixels_equal_pil_decode(zip_data: Dataset, zip_members: dict[str, bytes]):
    for split in (zip_data.train, zip_data.val):
        for i, name in enumerate(split.files):
            np.testing.assert_array_equal(split.images[i], decode_rgb(zip_members[name]), err_msg=name)


def test_zip_and_directory_agree(zip_data: Dataset, synth_dir: Path):
    from_dir = load_dataset(synth_dir, SIZE, threads=2)
    assert from_dir.wnids == zip_data.wnids
    assert from_dir.names == zip_data.names
    for a, b in ((from_dir.train, zip_data.train), (from_dir.val, zip_data.val)):
        assert a.files == b.files
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.images, b.images)


def test_directory_pointing_at_root_itself(zip_data: Dataset, synth_dir: Path):
    """`--data .../tiny-imagenet-200` works as well as its parent directory."""
    direct = load_dataset(synth_dir / ROOT_NAME, SIZE, threads=2)
    assert direct.wnids == zip_data.wnids
    np.testing.assert_array_equal(direct.train.images, zip_data.train.images)


def test_zip_without_root_prefix(tmp_path: Path, zip_members: dict[str, bytes], zip_data: Dataset):
    flat = write_zip(tmp_path / "flat.zip", zip_members, root="")
    data = load_dataset(flat, SIZE, threads=2)
    assert data.wnids == zip_data.wnids
    np.testing.assert_array_equal(data.val.images, zip_data.val.images)


def test_val_labels_follow_annotations(zip_data: Dataset, zip_members: dict[str, bytes]):
    annotations = {}
    for line in zip_members["val/val_annotations.txt"].decode().splitlines():
        fields = line.split("\t")
        annotations[f"val/images/{fields[0]}"] = fields[1]
    assert sorted(zip_data.val.files) == sorted(annotations)
    for name, label in zip(zip_data.val.files, zip_data.val.labels, strict=True):
        assert zip_data.wnids[label] == annotations[name]
    # the synthetic val order is shuffled: labels are not simply sorted by class
    assert not np.all(np.diff(zip_data.val.labels) >= 0)


def test_grayscale_jpegs_decode_to_three_equal_channels(zip_data: Dataset, zip_members: dict[str, bytes]):
    gray = grayscale_members(zip_members)
    splits = (zip_data.train, zip_data.val)
    loaded = {name: split.images[i] for split in splits for i, name in enumerate(split.files)}
    gray_loaded = [name for name in gray if name in loaded]
    assert any(n.startswith("train/") for n in gray_loaded) and any(n.startswith("val/") for n in gray_loaded)
    for name in gray_loaded:
        image = loaded[name]
        assert image.shape == (SIZE, SIZE, 3)
        assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])
        with Image.open(io.BytesIO(zip_members[name])) as luminance:
            np.testing.assert_array_equal(image[..., 0], np.asarray(luminance))
    colour = next(name for name in loaded if name not in gray)
    assert not np.array_equal(loaded[colour][..., 0], loaded[colour][..., 2])


def test_other_image_size_resizes(synth_zip: Path, zip_data: Dataset, zip_members: dict[str, bytes]):
    data = load_dataset(synth_zip, 48, threads=2)
    assert data.train.images.shape == (TRAIN, 48, 48, 3)
    assert data.val.images.shape == (VAL, 48, 48, 3)
    assert data.train.files == zip_data.train.files
    np.testing.assert_array_equal(data.train.labels, zip_data.train.labels)
    for i in (0, TRAIN - 1):
        expected = decode_rgb(zip_members[data.train.files[i]], 48)
        np.testing.assert_array_equal(data.train.images[i], expected)


# -- the decoded cache -----------------------------------------------------------------------------
def test_cache_roundtrip(synth_zip: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    first = load_dataset(synth_zip, SIZE, cache_dir=cache, threads=2)
    assert first.decode_seconds > 0
    assert list((cache / "decoded").iterdir())  # something was written
    second = load_dataset(synth_zip, SIZE, cache_dir=cache, threads=2)
    assert second.from_cache and second.decode_seconds == first.decode_seconds
    assert second.wnids == first.wnids
    assert second.names == first.names
    assert second.skipped == first.skipped
    assert second.source == str(synth_zip)
    for a, b in ((first.train, second.train), (first.val, second.val)):
        assert a.files == b.files
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.images, b.images)
        assert b.images.dtype == np.uint8 and b.labels.dtype == np.int32


def test_decode_writes_straight_into_the_cache(synth_zip: Path, tmp_path: Path, zip_data: Dataset):
    """A first run decodes into the cache's memory-mapped files (no in-memory copy) and leaves no partial dir."""
    cache = tmp_path / "cache"
    first = load_dataset(synth_zip, SIZE, cache_dir=cache, threads=2)
    assert not first.from_cache
    assert isinstance(first.train.images, np.memmap) and isinstance(first.val.images, np.memmap)
    assert [p.name for p in (cache / "decoded").iterdir() if "partial" in p.name] == []
    for decoded, in_memory in ((first.train, zip_data.train), (first.val, zip_data.val)):
        np.testing.assert_array_equal(decoded.images, in_memory.images)
        np.testing.assert_array_equal(decoded.labels, in_memory.labels)


def test_cache_is_keyed_by_image_size(synth_zip: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    load_dataset(synth_zip, SIZE, cache_dir=cache, threads=2)
    other = load_dataset(synth_zip, 40, cache_dir=cache, threads=2)
    assert not other.from_cache
    assert other.train.images.shape[1:] == (40, 40, 3)
    assert len(list((cache / "decoded").iterdir())) == 2


def test_cache_is_keyed_by_source(synth_zip: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    load_dataset(synth_zip, SIZE, cache_dir=cache, threads=2)
    copy = tmp_path / "copy.zip"
    copy.write_bytes(synth_zip.read_bytes())
    assert not load_dataset(copy, SIZE, cache_dir=cache, threads=2).from_cache


def test_cache_notices_changed_directory(tmp_path: Path):
    """Editing images inside a dataset directory must not serve the stale decoded cache."""
    data = tmp_path / "data"
    make_synthetic_dataset(data, **{**SYNTH, "grayscale_fraction": 0.0})
    cache = tmp_path / "cache"
    first = load_dataset(data, SIZE, cache_dir=cache, threads=2)
    (data / ROOT_NAME / "train" / FISH / "images" / f"{FISH}_0.JPEG").unlink()
    second = load_dataset(data, SIZE, cache_dir=cache, threads=2)
    assert len(second.train) == len(first.train) - 1


# -- bad inputs ------------------------------------------------------------------------------------
def test_missing_path(tmp_path: Path):
    missing = tmp_path / "nowhere.zip"
    message = load_error(missing)
    assert str(missing) in message
    assert "does not exist" in message


def test_missing_path_with_cache_dir(tmp_path: Path):
    missing = tmp_path / "nowhere.zip"
    assert str(missing) in load_error(missing, tmp_path)


def test_file_that_is_not_a_zip(tmp_path: Path):
    path = tmp_path / "data.zip"
    path.write_bytes(b"this is not a zip archive\n" * 10)
    message = load_error(path)
    assert str(path) in message
    assert "neither a zip file nor a directory" in message


def test_missing_wnids(tmp_path: Path, synth_zip: Path):
    path = modified_zip(synth_zip, tmp_path / "d.zip", lambda f: f.pop("wnids.txt"))
    message = load_error(path, tmp_path)
    assert str(path) in message
    assert "wnids.txt" in message and "missing" in message


def test_missing_wnids_in_directory(tmp_path: Path):
    root = tmp_path / "data" / ROOT_NAME
    (root / "train").mkdir(parents=True)
    message = load_error(tmp_path / "data")
    assert str(root / "wnids.txt") in message


def test_empty_wnids(tmp_path: Path, synth_zip: Path):
    def change(files):
        files["wnids.txt"] = b"\n\n"

    message = load_error(modified_zip(synth_zip, tmp_path / "d.zip", change))
    assert "wnids.txt" in message and "no classes" in message


def test_missing_val_annotations(tmp_path: Path, synth_zip: Path):
    path = modified_zip(synth_zip, tmp_path / "d.zip", lambda f: f.pop("val/val_annotations.txt"))
    message = load_error(path, tmp_path)
    assert str(path) in message
    assert "val/val_annotations.txt" in message


def test_wnid_without_images(tmp_path: Path, synth_zip: Path):
    def change(files):
        files["wnids.txt"] += b"n99999999\n"

    path = modified_zip(synth_zip, tmp_path / "d.zip", change)
    message = load_error(path, tmp_path)
    assert "n99999999" in message
    assert f"{ROOT_NAME}/train/n99999999/images/" in message
    assert str(path) in message


def test_val_annotation_with_unknown_wnid(tmp_path: Path, synth_zip: Path):
    def change(files):
        lines = files["val/val_annotations.txt"].decode().splitlines(keepends=True)
        lines[1] = lines[1].replace(lines[1].split("\t")[1], "n12345678")
        files["val/val_annotations.txt"] = "".join(lines).encode()

    path = modified_zip(synth_zip, tmp_path / "d.zip", change)
    message = load_error(path, tmp_path)
    assert "n12345678" in message
    assert "line 2" in message
    assert "val/val_annotations.txt" in message


def test_class_whose_images_are_all_unreadable(tmp_path: Path, synth_zip: Path):
    def change(files):
        for name in [n for n in files if n.startswith("train/n90000003/images/")]:
            files[name] = b"garbage"

    message = load_error(modified_zip(synth_zip, tmp_path / "d.zip", change))
    assert "n90000003" in message and "no readable train images" in message


def test_unreadable_images_are_skipped(tmp_path: Path, synth_zip: Path, zip_data: Dataset):
    truncated, not_image = f"train/{DUCK}/images/{DUCK}_1.JPEG", "train/n90000002/images/n90000002_4.JPEG"

    def change(files):
        files[truncated] = files[truncated][: len(files[truncated]) // 2]
        files[not_image] = b"<html>not an image</html>\n"

    path = modified_zip(synth_zip, tmp_path / "d.zip", change)
    data = load_dataset(path, SIZE, threads=2)
    assert sorted(data.skipped) == sorted(f"{path}:{ROOT_NAME}/{name}" for name in (truncated, not_image))
    assert len(data.train) == TRAIN - 2
    assert len(data.val) == VAL
    assert truncated not in data.train.files and not_image not in data.train.files
    keep = [i for i, name in enumerate(zip_data.train.files) if name not in (truncated, not_image)]
    assert data.train.files == [zip_data.train.files[i] for i in keep]
    np.testing.assert_array_equal(data.train.labels, zip_data.train.labels[keep])
    np.testing.assert_array_equal(data.train.images, zip_data.train.images[keep])
    np.testing.assert_array_equal(data.val.images, zip_data.val.images)


def test_skipped_survive_the_cache(tmp_path: Path, synth_zip: Path):
    name = f"train/{FISH}/images/{FISH}_2.JPEG"

    def change(files):
        files[name] = b"nope"

    path = modified_zip(synth_zip, tmp_path / "d.zip", change)
    first = load_dataset(path, SIZE, cache_dir=tmp_path / "cache", threads=2)
    second = load_dataset(path, SIZE, cache_dir=tmp_path / "cache", threads=2)
    assert second.from_cache and second.decode_seconds == first.decode_seconds
    assert first.skipped == second.skipped == [f"{path}:{ROOT_NAME}/{name}"]
    assert len(second.train) == TRAIN - 1
    in_memory = load_dataset(path, SIZE, threads=2)  # the cache holds the compacted split, not a gap
    for cached in (first, second):
        assert cached.train.files == in_memory.train.files
        np.testing.assert_array_equal(cached.train.images, in_memory.train.images)
        np.testing.assert_array_equal(cached.train.labels, in_memory.train.labels)


def test_non_image_suffixes_are_ignored(tmp_path: Path, synth_zip: Path, zip_data: Dataset):
    def change(files):
        files[f"train/{FISH}/images/notes.txt"] = b"not listed"

    data = load_dataset(modified_zip(synth_zip, tmp_path / "d.zip", change), SIZE, threads=2)
    assert data.skipped == []
    assert data.train.files == zip_data.train.files


@pytest.mark.parametrize("member", [f"{ROOT_NAME}/../evil.txt", "/etc/x", f"{ROOT_NAME}/train/../../evil"])
def test_unsafe_zip_member(tmp_path: Path, synth_zip: Path, member: str):
    path = tmp_path / "unsafe.zip"
    with zipfile.ZipFile(synth_zip) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            target.writestr(info, source.read(info))
        target.writestr(member, b"x")
    assert member in zipfile.ZipFile(path).namelist()  # zipfile kept the name as written
    message = load_error(path, tmp_path)
    assert "unsafe" in message
    assert member in message
    assert str(path) in message
    assert not (tmp_path / "evil.txt").exists()


def test_symlink_zip_member_is_unsafe(tmp_path: Path, synth_zip: Path):
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(synth_zip) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            target.writestr(info, source.read(info))
        link = zipfile.ZipInfo(f"{ROOT_NAME}/link")
        link.external_attr = (0o120777 << 16)
        target.writestr(link, "/etc/passwd")
    assert "unsafe" in load_error(path)


def test_class_index(zip_data: Dataset, synth_zip: Path):
    assert zip_data.class_index(FISH) == 0
    assert zip_data.class_index(DUCK) == 1
    assert zip_data.class_index(zip_data.wnids[-1]) == CLASSES - 1
    with pytest.raises(JobError) as caught:
        zip_data.class_index("n00000001")
    assert caught.value.exit_code == 2
    assert "n00000001" in str(caught.value)
    assert str(synth_zip) in str(caught.value)


# -- the real mini subset --------------------------------------------------------------------------
@pytest.mark.slow
def test_mini_dataset(mini_zip: Path, tmp_path: Path):
    data = load_dataset(mini_zip, 64, cache_dir=tmp_path / "cache")
    assert len(data.wnids) == 200 and len(set(data.wnids)) == 200
    assert len(data.train) == 8820 and len(data.val) == 2080
    assert data.skipped == []
    assert data.train.images.shape == (8820, 64, 64, 3) and data.train.images.dtype == np.uint8
    assert data.val.images.shape == (2080, 64, 64, 3)
    train_counts = np.bincount(data.train.labels, minlength=200)
    val_counts = np.bincount(data.val.labels, minlength=200)
    for wnid in (FISH, DUCK):
        index = data.class_index(wnid)
        assert train_counts[index] == 450 and val_counts[index] == 50
    others = [i for i, w in enumerate(data.wnids) if w not in (FISH, DUCK)]
    assert set(train_counts[others].tolist()) == {40} and set(val_counts[others].tolist()) == {10}
    assert "goldfish" in data.names[FISH] and "goose" in data.names[DUCK]

    # grayscale JPEGs (about 2%) decode to three equal channels
    with zipfile.ZipFile(mini_zip) as archive:
        gray = []
        for i, name in enumerate(data.train.files[::7]):
            with Image.open(io.BytesIO(archive.read(f"{ROOT_NAME}/{name}"))) as image:
                if image.mode == "L":
                    gray.append((i * 7, np.asarray(image)))
    assert gray, "expected grayscale JPEGs in the mini dataset"
    for index, luminance in gray:
        image = data.train.images[index]
        assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])
        np.testing.assert_array_equal(image[..., 0], luminance)

    cached = load_dataset(mini_zip, 64, cache_dir=tmp_path / "cache")
    assert cached.from_cache
    assert cached.wnids == data.wnids
    np.testing.assert_array_equal(cached.val.labels, data.val.labels)
    np.testing.assert_array_equal(cached.val.images, data.val.images)


# -- what the errors and warnings say --------------------------------------------------------------
def test_skip_messages_name_the_file_not_a_buffer(tmp_path: Path, synth_zip: Path, caplog):
    """An unreadable image's warning says why in words (it said `<_io.BytesIO object at 0x...>`)."""
    not_image = "train/n90000002/images/n90000002_4.JPEG"
    path = modified_zip(synth_zip, tmp_path / "d.zip", lambda f: f.update({not_image: b"<html>no image</html>"}))
    with caplog.at_level("WARNING", logger="job.data"):
        load_dataset(path, SIZE, threads=2)
    (message,) = [r.getMessage() for r in caplog.records if "Skipping" in r.getMessage()]
    assert message == f"Skipping unreadable image {path}:{ROOT_NAME}/{not_image} (not an image format PIL can read)"


def test_missing_wnid_names_the_file_in_the_zip_and_the_wnids_it_lists(tmp_path: Path, synth_zip: Path, caplog):
    """A required class absent from the data is one error naming wnids.txt inside the zip (it said
    `synth.zip/wnids.txt`) and a few wnids that exist, before any image is decoded."""
    with caplog.at_level("INFO", logger="job.data"), pytest.raises(JobError) as caught:
        load_dataset(synth_zip, SIZE, cache_dir=tmp_path / "cache", threads=2, required_wnids=[FISH, "n00000001"])
    message = str(caught.value)
    assert message.startswith(f"class n00000001 is not in {synth_zip}:{ROOT_NAME}/wnids.txt, which lists "
                              f"{CLASSES} classes ({FISH}, {DUCK}, ")
    assert "data.downstream_wnids" in message
    assert not [r for r in caplog.records if "Decoded" in r.getMessage()]  # failed before decoding
    assert not (tmp_path / "cache").exists()
    cached = load_dataset(synth_zip, SIZE, cache_dir=tmp_path / "cache2", threads=2)
    with pytest.raises(JobError) as caught:  # the same from the decoded cache
        load_dataset(synth_zip, SIZE, cache_dir=tmp_path / "cache2", required_wnids=["n00000001"])
    assert f"{synth_zip}:{ROOT_NAME}/wnids.txt" in str(caught.value)
    assert cached.wnids_file == f"{synth_zip}:{ROOT_NAME}/wnids.txt"


@pytest.mark.parametrize("root", [f"data/{ROOT_NAME}/", "download/"])
def test_zip_one_folder_deeper_is_found(tmp_path: Path, zip_members: dict[str, bytes], zip_data: Dataset,
                                        root: str):
    """A zip whose tree sits one folder deeper (a re-zipped download) loads like the original."""
    path = write_zip(tmp_path / "deeper.zip", zip_members, root=root)
    data = load_dataset(path, SIZE, threads=2)
    assert data.wnids == zip_data.wnids
    np.testing.assert_array_equal(data.train.images, zip_data.train.images)
    assert data.wnids_file == f"{path}:{root}wnids.txt"


def test_directory_one_folder_deeper_is_found(tmp_path: Path, synth_dir: Path, zip_data: Dataset):
    (tmp_path / "outer").mkdir()
    (tmp_path / "outer" / "inner").symlink_to(synth_dir, target_is_directory=True)
    data = load_dataset(tmp_path / "outer", SIZE, threads=2)
    assert data.wnids == zip_data.wnids and len(data.train) == TRAIN


def test_zip_without_wnids_says_where_it_looked(tmp_path: Path, zip_members: dict[str, bytes]):
    files = {name: data for name, data in zip_members.items() if name != "wnids.txt"}
    path = write_zip(tmp_path / "deep.zip", files, root=f"a/b/c/{ROOT_NAME}/")  # too deep to be searched
    message = load_error(path)
    assert f"{path}:wnids.txt is missing (nor is there a wnids.txt up to 2 folders down in {path})" in message
