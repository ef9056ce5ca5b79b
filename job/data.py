"""Tiny ImageNet in its original layout (zip or directory) → decoded uint8 arrays, wnids and labels.

Knows nothing of models or training. Decoding happens once; the arrays are cached as `.npy` files keyed
by the source's identity and image size, and later runs memory-map them. The train split's encoded images
(`EncodedImages`, for `data.store = "encoded"`) are cached beside them on first use.
"""

from __future__ import annotations

import bisect
import dataclasses
import errno
import hashlib
import io
import logging
import mmap
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
import typing
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from job.errors import JobError
from job.files import cache_key, fsync_path, read_json, write_json

log = logging.getLogger(__name__)

ROOT_NAME = "tiny-imagenet-200"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
CACHE_FORMAT_VERSION = 2
DECODE_CHUNK = 512  # files read (or handed to the PIL threads) at once
# A split of at least this many images is decoded in-graph (job.decode: about half PIL's CPU time per image,
# no GIL); a smaller one with PIL alone (building the tf.data pipeline costs more than it saves).
IN_GRAPH_MIN_IMAGES = 1024
RELEASE_EVERY_IMAGES = 4096  # decoded images written between releases of the cache's mapped pages
PROGRESS_EVERY_S = 10.0
# What a corrupt, truncated or unsupported image file raises while it is decoded.
UNREADABLE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
# What a damaged zip member raises while it is read (bad CRC, bad deflate stream): its bytes are unreadable.
CORRUPT_MEMBER_ERRORS = (KeyError, zipfile.BadZipFile, zlib.error, EOFError)
# An OSError while reading (EIO, ESTALE on NFS or a /gcs/ mount) is the storage's, not the image's: retried,
# then the run fails; never cached as a smaller dataset.
READ_ATTEMPTS = 4
READ_RETRY_DELAY_S = 0.5  # doubled after each failed attempt
META_FILE = "meta.json"
# The encoded train images, beside the decoded arrays of the same cache (same source, same size): one file of
# concatenated bytes and the offsets of each image in it (written last: it vouches for the bytes).
ENCODED_FORMAT_VERSION = 1
ENCODED_BYTES = f"{{split}}_encoded-{ENCODED_FORMAT_VERSION}.bin"
ENCODED_OFFSETS = f"{{split}}_encoded-{ENCODED_FORMAT_VERSION}_offsets.npy"
ENCODE_CHUNK = 2048  # images read, checked and written at once (~25 MB of decoded pixels at 64 px)
PARTIAL_MARKER = ".partial-"
# A decode in progress: <key>.partial-<host>-<pid>-<random>. Another host's partial (a shared cache) is only
# removed once nothing in it changed for this long.
STALE_PARTIAL_AGE_S = 24 * 3600.0
HINT = "point --data at the tiny-imagenet-200 zip or directory (or make one with `python -m job synth`)"
WNIDS_FILE = "wnids.txt"  # marks the dataset's root: found at the top or up to MAX_ROOT_DEPTH folders down
MAX_ROOT_DEPTH = 2
WNIDS_SHOWN = 5  # wnids an error about a missing class lists
# PIL names the buffer it read ("cannot identify image file <_io.BytesIO object at 0x7f...>"): not the user's file.
BUFFER_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


@dataclass
class ImageSet:
    """Decoded images of one split: uint8 [N, H, W, 3], int32 class indices into `wnids`."""

    images: np.ndarray
    labels: np.ndarray
    files: list[str]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    """Tiny ImageNet decoded: class ids, names, train and val splits, and what could not be read."""

    wnids: list[str]
    names: dict[str, str]
    train: ImageSet
    val: ImageSet
    skipped: list[str] = field(default_factory=list)
    decode_seconds: float = 0.0  # time the first decode of this source took (kept in the cache)
    source: str = ""
    from_cache: bool = False
    wnids_file: str = ""  # where the class list was read: a path, or ZIP:tiny-imagenet-200/wnids.txt
    cache: Path | None = None  # the decode cache it was read from (None: decoded without one)

    def class_index(self, wnid: str) -> int:
        """Index of a wnid, or a JobError naming it and the data."""
        check_wnids(self.wnids, [wnid], self.wnids_file or f"{self.source}/{WNIDS_FILE}")
        return self.wnids.index(wnid)


def check_wnids(wnids: list[str], required: list[str], where: str) -> None:
    """A JobError naming the first of `required` absent from `wnids` (read from `where`), and a few that exist."""
    for wnid in required:
        if wnid not in wnids:
            shown = ", ".join(wnids[:WNIDS_SHOWN]) + (", ..." if len(wnids) > WNIDS_SHOWN else "")
            raise JobError(f"class {wnid} is not in {where}, which lists {len(wnids)} classes ({shown}): set "
                           "data.downstream_wnids to two of them.")


def unreadable_reason(err: BaseException) -> str:
    """Why an image could not be decoded, in words about the file (not about PIL's in-memory buffer)."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image format PIL can read"
    return BUFFER_REPR.sub("", str(err)) or type(err).__name__


class _Tree:
    """Read-only view of the dataset files in a zip or a directory, rooted at `tiny-imagenet-200/`."""

    def __init__(self, path: Path):
        self.path = path
        self._images: list[str] | None = None  # image file names, sorted, once files_under is asked
        if path.is_dir():
            self._zip = None
            markers = [p.relative_to(path).as_posix() for depth in range(MAX_ROOT_DEPTH + 1)
                       for p in path.glob("*/" * depth + WNIDS_FILE)]
            has_root_name = (path / ROOT_NAME).is_dir()
            prefix = _root_prefix(markers + ([f"{ROOT_NAME}/"] if has_root_name else []))
            root = path / prefix if prefix else path
            self._root = root
            self._names = {
                str(p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file() and not p.is_symlink()
            }
        elif zipfile.is_zipfile(path):
            self._zip = zipfile.ZipFile(path)
            self._check_members(self._zip)
            names = [n for n in self._zip.namelist() if not n.endswith("/")]
            prefix = _root_prefix(names)
            self._root = prefix
            self._names = {n[len(prefix) :] for n in names if n.startswith(prefix)}
        elif path.exists():
            raise JobError(f"{path} is neither a zip file nor a directory: {HINT}.")
        else:
            raise JobError(f"{path} does not exist: {HINT}.")

    def _check_members(self, archive: zipfile.ZipFile) -> None:
        for info in archive.infolist():
            parts = PurePosixPath(info.filename).parts
            is_link = stat.S_ISLNK(info.external_attr >> 16)
            if info.filename.startswith(("/", "\\")) or ".." in parts or is_link or ":" in info.filename:
                raise JobError(
                    f"{self.path} holds an unsafe entry {info.filename!r} (absolute path, '..' or link): "
                    "refusing to read it; re-create the zip from the dataset directory."
                )

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def has(self, name: str) -> bool:
        return name in self._names

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(f"{self._root}{name}")
        return (self._root / name).read_bytes()

    def text(self, name: str) -> str:
        return self.read(name).decode("utf-8", errors="replace")

    def files_under(self, prefix: str) -> list[str]:
        """The image files under `prefix`, sorted (found by bisection: one sort for all classes' folders)."""
        if self._images is None:
            self._images = sorted(n for n in self._names if n.lower().endswith(IMAGE_SUFFIXES))
        found = []
        for name in self._images[bisect.bisect_left(self._images, prefix) :]:
            if not name.startswith(prefix):
                break
            found.append(name)
        return found

    def describe(self, name: str) -> str:
        return f"{self.path}:{self._root}{name}" if self._zip is not None else str(self._root / name)


def _root_prefix(names: list[str]) -> str:
    """The dataset's root inside a tree ("", "tiny-imagenet-200/", "data/tiny-imagenet-200/"): the shallowest
    folder holding wnids.txt, up to MAX_ROOT_DEPTH folders down (tiny-imagenet-200/ first among equals); with
    none, tiny-imagenet-200/ when the tree has it, else the top."""
    roots = [name[: -len(WNIDS_FILE)] for name in names
             if name.rpartition("/")[2] == WNIDS_FILE and name.count("/") <= MAX_ROOT_DEPTH]
    if roots:
        return min(roots, key=lambda root: (root.count("/"), not root.endswith(f"{ROOT_NAME}/"), root))
    return f"{ROOT_NAME}/" if any(n.startswith(f"{ROOT_NAME}/") for n in names) else ""


def load_dataset(path: Path, image_size: int, cache_dir: Path | None = None, threads: int = 0,
                 required_wnids: list[str] = ()) -> Dataset:
    """Read, validate and decode the dataset; reuse the decoded cache when the source is unchanged.

    `required_wnids`: classes the caller needs; one missing is a JobError before anything is decoded.
    """
    path = Path(path)
    cache = _cache_dir(path, image_size, cache_dir) if cache_dir is not None else None
    if cache is not None and (cache / META_FILE).is_file():
        dataset = _load_cache(cache, str(path))
        check_wnids(dataset.wnids, list(required_wnids), dataset.wnids_file or f"{path}/{WNIDS_FILE}")
        log.info("Using decoded images cached in %s", cache)
        return dataset
    tree = _Tree(path)
    wnids, names = _read_classes(tree)
    check_wnids(wnids, list(required_wnids), tree.describe(WNIDS_FILE))
    train_files, train_labels = _train_files(tree, wnids)
    val_files, val_labels = _val_files(tree, wnids)
    # With a cache, images are decoded straight into its memory-mapped .npy files: a large dataset is never
    # held in process memory, and nothing is copied to save it.
    if cache is not None:
        _remove_stale_partials(cache.parent)
    partial = _partial_cache(cache) if cache is not None else None
    try:
        start = time.perf_counter()
        skipped: list[str] = []
        train = _decode_split(tree, train_files, train_labels, image_size, skipped, "train", threads, partial)
        val = _decode_split(tree, val_files, val_labels, image_size, skipped, "val", threads, partial)
        seconds = time.perf_counter() - start
        log.info(
            "Decoded %d train + %d val images in %.1f s (%.0f images/s); skipped %d unreadable",
            len(train), len(val), seconds, (len(train) + len(val)) / max(seconds, 1e-9), len(skipped),
        )
        empty = sorted(set(range(len(wnids))) - set(train.labels.tolist()))
        if empty:
            wnid = wnids[empty[0]]
            raise JobError(
                f"class {wnid} has no readable train images in {tree.describe(f'train/{wnid}/images/')}: "
                "add its images or remove it from wnids.txt."
            )
        tree.close()
        dataset = Dataset(wnids, names, train, val, skipped, seconds, str(path), wnids_file=tree.describe(WNIDS_FILE))
        if partial is None:
            return dataset
        _save_cache(partial, cache, dataset)
    finally:
        if partial is not None and partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    del dataset, train, val
    return dataclasses.replace(_load_cache(cache, str(path)), from_cache=False)


def _read_classes(tree: _Tree) -> tuple[list[str], dict[str, str]]:
    if not tree.has(WNIDS_FILE):
        raise JobError(f"{tree.describe(WNIDS_FILE)} is missing (nor is there a {WNIDS_FILE} up to {MAX_ROOT_DEPTH} "
                       f"folders down in {tree.path}): {HINT}.")
    wnids = [line.strip() for line in tree.text("wnids.txt").splitlines() if line.strip()]
    if not wnids:
        raise JobError(f"{tree.describe('wnids.txt')} lists no classes: {HINT}.")
    names = {w: w for w in wnids}
    if tree.has("words.txt"):
        wanted = set(wnids)
        for line in tree.text("words.txt").splitlines():
            wnid, _, words = line.partition("\t")
            if wnid in wanted:
                names[wnid] = words.strip()
    return wnids, names


def _train_files(tree: _Tree, wnids: list[str]) -> tuple[list[str], list[int]]:
    files, labels = [], []
    for index, wnid in enumerate(wnids):
        found = tree.files_under(f"train/{wnid}/images/")
        if not found:
            raise JobError(
                f"class {wnid} has no images in {tree.describe(f'train/{wnid}/images/')}: "
                "add its images or remove it from wnids.txt."
            )
        files += found
        labels += [index] * len(found)
    return files, labels


def _val_files(tree: _Tree, wnids: list[str]) -> tuple[list[str], list[int]]:
    name = "val/val_annotations.txt"
    if not tree.has(name):
        raise JobError(f"{tree.describe(name)} is missing: the val split needs its labels; {HINT}.")
    index = {w: i for i, w in enumerate(wnids)}
    files, labels = [], []
    for number, line in enumerate(tree.text(name).splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        image, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise JobError(
                f"{tree.describe(name)} line {number} names class {wnid}, absent from wnids.txt: fix either file."
            )
        files.append(f"val/images/{image}")
        labels.append(index[wnid])
    return files, labels


def _decode_split(
    tree: _Tree,
    files: list[str],
    labels: list[int],
    size: int,
    skipped: list[str],
    split: str,
    threads: int,
    cache: Path | None = None,
) -> ImageSet:
    """Decode every image to RGB uint8 `size`x`size`; unreadable files are appended to `skipped`.

    With `cache`, the images are written into `cache/<split>_images.npy` through a memory map whose
    pages are handed back to the page cache as decoding goes. A split of IN_GRAPH_MIN_IMAGES or more is
    decoded in-graph (`job.decode`); what that path leaves (not a JPEG, CMYK, another size, unreadable) and
    a smaller split are decoded one file at a time with PIL.
    """
    shape = (len(files), size, size, 3)
    target = cache / f"{split}_images.npy" if cache is not None else None
    images = np.lib.format.open_memmap(target, "w+", np.uint8, shape) if target else np.zeros(shape, np.uint8)
    ok = np.zeros(len(files), bool)
    progress = _Progress(split, len(files), written=images)
    if len(files) >= IN_GRAPH_MIN_IMAGES:
        _decode_in_graph(tree, files, size, images, ok, threads, progress)
    rest = np.flatnonzero(~ok)
    if 0 < len(rest) < len(files):
        log.info("Decoding %d %s images one at a time (not a %d px RGB or grayscale JPEG, or unreadable)",
                 len(rest), split, size)
    _decode_in_threads(tree, files, rest, size, images, ok, threads or os.cpu_count() or 1, progress)
    skipped += [tree.describe(f) for f, good in zip(files, ok) if not good]
    kept = np.flatnonzero(ok)
    for position, index in enumerate(kept):  # compact in place: no second copy of a large split
        if position != index:
            images[position] = images[index]
    if target is not None:
        images.flush()
        if len(kept) < len(files):  # rare: rewrite the file with the readable images only
            compacted = np.array(images[: len(kept)])
            del images
            np.save(target, compacted)
            images = compacted
        release_pages(images)
    return ImageSet(images[: len(kept)], np.asarray(labels, np.int32)[kept], [files[i] for i in kept])


class _Progress:
    """Logs how far a split's decode is, at most every PROGRESS_EVERY_S; with `written`, the array decoded into,
    also hands its written pages to the page cache every RELEASE_EVERY_IMAGES images."""

    def __init__(self, split: str, total: int, written: np.ndarray | None = None):
        self.split, self.total, self.done, self.written = split, total, 0, written
        self.last = time.perf_counter()
        self.since_release = 0

    def add(self, count: int) -> None:
        self.done += count
        if time.perf_counter() - self.last > PROGRESS_EVERY_S:
            self.last = time.perf_counter()
            log.info("Decoding %s: %d/%d images", self.split, self.done, self.total)
        self.since_release += count
        if self.written is not None and self.since_release >= RELEASE_EVERY_IMAGES:
            release_pages(self.written)  # written pages go to the page cache, not this process
            self.since_release = 0


def _decode_in_graph(tree: _Tree, files: list[str], size: int, images: np.ndarray, ok: np.ndarray, threads: int,
                     progress: _Progress) -> None:
    """Decode the JPEGs of `files` in-graph on every core (`job.decode`), written into `images` a batch at a time
    (`progress` releasing the written pages) and marked in `ok`; the others are left. A file that cannot be read
    is a JobError, as on the PIL path."""
    from job.decode import decoded_batches  # TensorFlow: only for a large decode

    failures: list[JobError] = []

    def chunks() -> Iterator[tuple[list[int], list[bytes]]]:  # runs on a tf.data thread
        for begin in range(0, len(files), DECODE_CHUNK):
            positions, data = [], []
            for i in range(begin, min(begin + DECODE_CHUNK, len(files))):
                try:
                    data.append(read_with_retries(tree, files[i]))
                except CORRUPT_MEMBER_ERRORS:
                    continue  # the PIL path reads it again and says why it is unreadable
                except JobError as err:
                    failures.append(err)
                    return
                positions.append(i)
            yield positions, data

    for positions, batch in decoded_batches(chunks(), size, threads):
        images[positions] = batch
        ok[positions] = True
        progress.add(len(positions))
    release_pages(images)
    if failures:
        raise failures[0]


def _decode_in_threads(tree: _Tree, files: list[str], indices: np.ndarray, size: int, images: np.ndarray,
                       ok: np.ndarray, workers: int, progress: _Progress) -> None:
    """Decode `files[indices]` into `images` with PIL on a thread pool, a chunk at a time, its `progress` releasing
    written pages as it goes; unreadable images are logged and left out of `ok`."""
    failed = threading.Event()  # one file could not be read: the others stop, the run fails

    def decode(i: int) -> None:
        if failed.is_set():
            return
        try:
            pixels, reason = _read_and_decode(tree, files[i], size)
        except JobError:
            failed.set()
            raise
        if pixels is None:
            log.warning("Skipping unreadable image %s (%s)", tree.describe(files[i]), reason)
        else:
            images[i] = pixels
            ok[i] = True

    with ThreadPoolExecutor(workers) as threads:
        for begin in range(0, len(indices), DECODE_CHUNK):
            chunk = indices[begin : begin + DECODE_CHUNK]
            list(threads.map(decode, chunk))
            progress.add(len(chunk))


def _read_and_decode(tree: _Tree, name: str, size: int) -> tuple[np.ndarray | None, str]:
    """(pixels, "") for one image file, or (None, why) when its bytes are unreadable; JobError on an I/O error."""
    try:
        data = read_with_retries(tree, name)
    except CORRUPT_MEMBER_ERRORS as err:
        return None, unreadable_reason(err)
    try:
        return decode_image(data, size), ""
    except UNREADABLE_ERRORS as err:
        return None, unreadable_reason(err)


def read_with_retries(tree: _Tree, name: str) -> bytes:
    """The bytes of one file, an OSError retried READ_ATTEMPTS times in all; then one JobError naming it."""
    delay = READ_RETRY_DELAY_S
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return tree.read(name)
        except OSError as err:
            if attempt == READ_ATTEMPTS:
                reason = err.strerror or errno.errorcode.get(err.errno or 0) or str(err)
                raise JobError(
                    f"could not read {tree.describe(name)} ({reason}, {READ_ATTEMPTS} attempts): check the disk or "
                    "mount holding --data, then rerun (nothing was cached)."
                ) from err
            log.warning("Reading %s failed (%s); retrying in %.1f s", tree.describe(name), err, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes (any format and mode PIL reads) → RGB uint8 [size, size, 3], resized bilinearly.

    The one decode path of training data and of `job predict`; raises one of UNREADABLE_ERRORS.
    """
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image)


def release_pages(array: np.ndarray) -> None:
    """Drop a memory-mapped array's pages from this process (they stay in the page cache, re-read on access)."""
    mapping = getattr(array, "_mmap", None) or getattr(getattr(array, "base", None), "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise"):
        mapping.madvise(mmap.MADV_DONTNEED)


def source_identity(path: Path) -> str:
    """What changes when the data changes: a file's size and mtime, or those of every file in a tree."""
    if path.is_dir():
        digest = hashlib.sha1()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            status = file.stat()
            digest.update(f"{file.relative_to(path)}|{status.st_size}|{status.st_mtime_ns}\n".encode())
        return f"{path.resolve()}|{digest.hexdigest()}"
    status = path.stat() if path.exists() else None
    return f"{path.resolve()}|{status.st_size if status else 0}|{status.st_mtime_ns if status else 0}"


def _cache_dir(path: Path, image_size: int, cache_root: Path) -> Path:
    identity = source_identity(path)
    key = cache_key(f"{identity}|{image_size}|{CACHE_FORMAT_VERSION}")
    return Path(cache_root).expanduser() / "decoded" / key


def _partial_cache(cache: Path) -> Path:
    cache.parent.mkdir(parents=True, exist_ok=True)
    owner = f"{socket.gethostname()}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(dir=cache.parent, prefix=f"{cache.name}{PARTIAL_MARKER}{owner}"))


def _remove_stale_partials(root: Path) -> None:
    """Delete what killed decodes left in `root`: partial caches of this host whose process is gone, and any
    untouched for STALE_PARTIAL_AGE_S (another host's, on a shared cache). Live decodes are left alone."""
    if not root.is_dir():
        return
    host = socket.gethostname()
    for partial in root.glob(f"*{PARTIAL_MARKER}*"):
        owner = partial.name.partition(PARTIAL_MARKER)[2]
        owner_host, _, rest = owner.rpartition("-")[0].rpartition("-")
        pid = rest if owner_host == host else ""
        if (pid.isdigit() and not _process_exists(int(pid))) or _idle_seconds(partial) > STALE_PARTIAL_AGE_S:
            log.info("Removing %s: left by a decode that did not finish", partial)
            shutil.rmtree(partial, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _idle_seconds(directory: Path) -> float:
    """Seconds since anything in `directory` last changed."""
    try:
        newest = max([directory.stat().st_mtime, *(p.stat().st_mtime for p in directory.rglob("*"))])
    except OSError:  # removed meanwhile
        return 0.0
    return time.time() - newest


def _save_cache(partial: Path, cache: Path, dataset: Dataset) -> None:
    """Complete the cache being decoded in `partial` (labels, file lists) and publish it atomically as `cache`."""
    for split in ("train", "val"):
        np.save(partial / f"{split}_labels.npy", getattr(dataset, split).labels)
    meta = {
        "wnids": dataset.wnids,
        "names": dataset.names,
        "skipped": dataset.skipped,
        "train_files": dataset.train.files,
        "val_files": dataset.val.files,
        "decode_seconds": dataset.decode_seconds,
        "wnids_file": dataset.wnids_file,
    }
    write_json(partial / META_FILE, meta)
    # meta.json vouches for the arrays beside it: all of them reach the disk before the cache is published.
    for path in (*partial.iterdir(), partial):
        fsync_path(path)
    try:
        os.replace(partial, cache)
        fsync_path(cache.parent)
        log.info("Cached decoded images in %s", cache)
    except OSError:  # another worker cached the same source first
        shutil.rmtree(partial, ignore_errors=True)


def _load_cache(cache: Path, source: str) -> Dataset:
    meta = read_json(cache / META_FILE, f"delete {cache} to decode the images again")

    def split(name: str) -> ImageSet:
        return ImageSet(
            np.load(cache / f"{name}_images.npy", mmap_mode="r"),
            np.load(cache / f"{name}_labels.npy"),
            meta[f"{name}_files"],
        )

    return Dataset(
        meta["wnids"], meta["names"], split("train"), split("val"), meta["skipped"], meta["decode_seconds"], source,
        from_cache=True, wnids_file=meta.get("wnids_file", ""),  # caches from before it was recorded: ""
        cache=cache,
    )


@dataclass
class EncodedImages:
    """Encoded images of one split: image i is `data[offsets[i]:offsets[i + 1]]`, a JPEG or a lossless PNG."""

    data: np.ndarray  # uint8 [total bytes], memory-mapped from the cache when there is one
    offsets: np.ndarray  # int64 [N + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> bytes:
        return self.data[self.offsets[index] : self.offsets[index + 1]].tobytes()

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])


def encoded_train_images(dataset: Dataset, threads: int = 0) -> EncodedImages:
    """The train split as encoded bytes that decode to exactly its pixels (`dataset.train.images`).

    Each image is its source file when it is a JPEG that `job.decode` decodes to the cached pixels bit for bit,
    else a lossless PNG of those pixels (PNG, CMYK, resized or otherwise PIL-decoded sources). Built once from
    `--data` (`dataset.source`) and cached beside the decoded arrays (`dataset.cache`), memory-mapped after.
    """
    split = dataset.train
    if dataset.cache is None:
        buffer = io.BytesIO()
        offsets = _encode_split(dataset, split, buffer, threads)
        return EncodedImages(np.frombuffer(buffer.getvalue(), np.uint8), offsets)
    target, index = dataset.cache / ENCODED_BYTES.format(split="train"), dataset.cache / ENCODED_OFFSETS.format(
        split="train")
    if index.is_file():
        encoded = _load_encoded(target, index, len(split))
        if encoded is not None:
            return encoded
        log.warning("The encoded images cached in %s do not match its decoded ones: encoding them again",
                    dataset.cache)
    _remove_stale_partials(dataset.cache)
    partial = _partial_cache(dataset.cache / "encoded")
    try:
        with open(partial / target.name, "wb") as out:
            offsets = _encode_split(dataset, split, out, threads)
        np.save(partial / index.name, offsets)
        for path in (partial / target.name, partial / index.name):
            fsync_path(path)
        os.replace(partial / target.name, target)  # the bytes first: the offsets vouch for them
        os.replace(partial / index.name, index)
        fsync_path(dataset.cache)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("Cached the encoded train images in %s", dataset.cache)
    encoded = _load_encoded(target, index, len(split))
    assert encoded is not None, "just written"
    return encoded


def _load_encoded(target: Path, index: Path, count: int) -> EncodedImages | None:
    """The cached encoded images, memory-mapped; None when the files do not hold `count` images."""
    offsets = np.load(index)
    size = target.stat().st_size if target.is_file() else -1
    if offsets.shape != (count + 1,) or offsets[0] != 0 or offsets[-1] != size or size == 0:
        return None
    return EncodedImages(np.memmap(target, np.uint8, "r"), offsets)


def _encode_split(dataset: Dataset, split: ImageSet, out: typing.BinaryIO, threads: int) -> np.ndarray:
    """Write each image of `split` to `out` (its source JPEG when exact, else a PNG of its pixels); the offsets."""
    from job.decode import exact_jpegs  # TensorFlow: only for the encoded store

    start = time.perf_counter()
    tree = _Tree(Path(dataset.source))
    offsets = np.zeros(len(split) + 1, np.int64)
    progress = _Progress("train (encoding)", len(split))
    pngs = 0
    try:
        for begin in range(0, len(split), ENCODE_CHUNK):
            names = split.files[begin : begin + ENCODE_CHUNK]
            pixels = np.asarray(split.images[begin : begin + len(names)])
            data = [_read_or_empty(tree, name) for name in names]
            exact = exact_jpegs(data, pixels, threads)
            for i, blob in enumerate(data):
                if not exact[i]:
                    blob, pngs = lossless_png(pixels[i]), pngs + 1
                out.write(blob)
                offsets[begin + i + 1] = offsets[begin + i] + len(blob)
            release_pages(split.images)
            progress.add(len(names))
    finally:
        tree.close()
    log.info("Encoded %d train images (%d as PNGs of their pixels: not a JPEG decoded exactly), %.0f MB, in %.1f s",
             len(split), pngs, offsets[-1] / 2**20, time.perf_counter() - start)
    return offsets


def _read_or_empty(tree: _Tree, name: str) -> bytes:
    """A source file's bytes; b"" (stored as a PNG of its pixels) when its zip member no longer reads."""
    try:
        return read_with_retries(tree, name)
    except CORRUPT_MEMBER_ERRORS:
        return b""


def lossless_png(pixels: np.ndarray) -> bytes:
    """RGB uint8 [H, W, 3] → PNG bytes that decode to exactly these pixels."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()
