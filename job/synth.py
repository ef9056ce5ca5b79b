"""Small synthetic dataset in the exact original Tiny ImageNet layout (for demos and tests).

Every image is one large dark object on a light, flat background. Nothing but the object's shape tells which
way is up: the background and the noise are the same in distribution under any rotation, and each image draws
its own colours, from one distribution for every class. Objects are upright shapes with a canonical "up" (a
fin, a head, a roof or a point on top; a body or a base at the bottom), drawn at a random position, slightly
tilted, stretched and facing left or right, each class covering the same share of the image in distribution.
The class is the shape family. The first two classes are the downstream pair, which differ in shape only: a
fish (long horizontal body, triangular tail, dorsal fin on top) and a duck (round body low down, a round head
on a neck above its front, a beak). The other classes are upright shapes built from the same parts (round
bodies and heads, triangular fins and sails, bars and domes), so features that tell which way is up for them
also describe the fish and the duck.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from job.data import ROOT_NAME

logger = logging.getLogger(__name__)

JPEG_QUALITY = 90
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # fixed so zips are byte-identical for a seed
SUPERSAMPLE = 2  # draw at 2x and average down, for anti-aliased edges
MIN_IMAGE_SIZE = 16
GRAYSCALE_MIN_IMAGES = 20  # with at least this many images, a positive fraction yields >= 1 grayscale JPEG
# Modes before the umask, as any file or folder a user creates: readable by all (0644 / 0755 with umask 022),
# in the zip's entries too (unzip applies them).
FILE_MODE, DIR_MODE = 0o666, 0o777
ZIP_FILE_MODE, ZIP_DIR_MODE = 0o644, 0o755
MSDOS_DIRECTORY = 0x10  # the external_attr bit that marks a directory entry for DOS-era readers

DOWNSTREAM_NAMES = {"n01443537": "goldfish, Carassius auratus", "n01855672": "goose"}
EXTRA_SYNSETS = (  # unrelated synsets, as the real words.txt lists all of WordNet
    ("n00001740", "entity"),
    ("n00001930", "physical entity"),
    ("n00002137", "abstraction, abstract entity"),
    ("n00002452", "thing"),
)
GENERATED_WNID_BASE = 90_000_000  # generated wnids are "n" + 8 digits: n90000002, n90000003, ...

# Split codes mixed into per-image seeds, so each image depends only on (seed, split, class, index).
SPLIT_TRAIN, SPLIT_VAL, SPLIT_TEST = 0, 1, 2


@dataclass(frozen=True)
class SynthSummary:
    """What `make_synthetic_dataset` wrote."""

    path: Path
    wnids: tuple[str, ...]
    train_images: int
    val_images: int
    test_images: int
    grayscale_images: int


def make_synthetic_dataset(
    output: Path,
    *,
    classes: int = 10,
    per_class: int = 40,
    val_per_class: int = 10,
    test_images: int = 10,
    image_size: int = 64,
    seed: int = 0,
    downstream_wnids: tuple[str, str] = ("n01443537", "n01855672"),
    downstream_per_class: int | None = None,
    grayscale_fraction: float = 0.02,
    force: bool = False,
) -> SynthSummary:
    """Write a synthetic Tiny ImageNet to `output` (a `.zip` file, or a directory holding `tiny-imagenet-200/`).

    Raises ValueError for invalid arguments and FileExistsError if the zip or `output/tiny-imagenet-200/`
    already exists, unless `force` (then it is replaced once the new one is complete).
    """
    output = Path(output)
    down_count = per_class if downstream_per_class is None else downstream_per_class
    _validate(classes, per_class, val_per_class, test_images, image_size, seed, downstream_wnids, down_count,
              grayscale_fraction)
    target = output if output.suffix.lower() == ".zip" else output / ROOT_NAME
    if not force and (target.exists() or target.is_symlink()):
        raise FileExistsError(f"{target} already exists: pass --force to replace it, or choose another --output")
    wnids = _make_wnids(classes, downstream_wnids)
    rng = np.random.default_rng(seed)

    train_counts = [down_count if c < 2 else per_class for c in range(classes)]
    val_classes = rng.permutation(np.repeat(np.arange(classes), val_per_class))
    total = sum(train_counts) + len(val_classes) + test_images
    grayscale_count = _grayscale_count(total, grayscale_fraction)
    grayscale = set(rng.choice(total, size=grayscale_count, replace=False).tolist())

    files = _dataset_files(wnids, train_counts, val_classes, test_images, image_size, seed, grayscale)
    if output.suffix.lower() == ".zip":
        _write_zip(output, files)
        path = output
    else:
        path = _write_directory(output, files)

    summary = SynthSummary(path=path, wnids=wnids, train_images=sum(train_counts), val_images=len(val_classes),
                           test_images=test_images, grayscale_images=grayscale_count)
    logger.info("wrote synthetic Tiny ImageNet (%d classes, %d train, %d val, %d test images, %d grayscale) to %s",
                classes, summary.train_images, summary.val_images, test_images, grayscale_count, path)
    return summary


def _validate(classes: int, per_class: int, val_per_class: int, test_images: int, image_size: int, seed: int,
              downstream_wnids: tuple[str, str], downstream_per_class: int, grayscale_fraction: float) -> None:
    """Raise ValueError naming the first invalid argument."""
    if classes < 2:
        raise ValueError(f"classes must be >= 2 (the two downstream classes), got {classes}")
    for name, value in (("per_class", per_class), ("downstream_per_class", downstream_per_class)):
        if value < 1:  # a class without train images is a dataset the job rejects
            raise ValueError(f"{name} must be >= 1 (every class needs train images), got {value}")
    for name, value in (("val_per_class", val_per_class), ("test_images", test_images), ("seed", seed)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    if not 0.0 <= grayscale_fraction <= 1.0:
        raise ValueError(f"grayscale_fraction must be in [0, 1], got {grayscale_fraction}")
    if len(downstream_wnids) != 2 or downstream_wnids[0] == downstream_wnids[1]:
        raise ValueError(f"downstream_wnids must be two distinct wnids, got {downstream_wnids}")
    for wnid in downstream_wnids:
        if len(wnid) != 9 or wnid[0] != "n" or not wnid[1:].isdigit():
            raise ValueError(f"downstream wnid {wnid!r} is not 'n' followed by 8 digits")


def _make_wnids(classes: int, downstream_wnids: tuple[str, str]) -> tuple[str, ...]:
    """Downstream wnids first, then generated ones that cannot collide with them."""
    wnids = list(downstream_wnids)
    index = len(wnids)
    while len(wnids) < classes:
        wnid = f"n{GENERATED_WNID_BASE + index:08d}"
        if wnid not in wnids:
            wnids.append(wnid)
        index += 1
    return tuple(wnids)


def _grayscale_count(total: int, fraction: float) -> int:
    """About `fraction` of `total`, but at least one when there are enough images and fraction > 0."""
    count = round(fraction * total)
    if fraction > 0 and total >= GRAYSCALE_MIN_IMAGES:
        count = max(count, 1)
    return min(count, total)


def _class_name(class_index: int, wnid: str) -> str:
    if wnid in DOWNSTREAM_NAMES:
        return DOWNSTREAM_NAMES[wnid]
    if class_index < 2:
        return ("fish", "duck")[class_index]
    return f"synthetic {GENERIC_SHAPES[(class_index - 2) % len(GENERIC_SHAPES)]} {class_index}"


def _dataset_files(wnids: tuple[str, ...], train_counts: list[int], val_classes: np.ndarray, test_images: int,
                   image_size: int, seed: int, grayscale: set[int]) -> Iterator[tuple[str, bytes]]:
    """Yield (path relative to the dataset root, content) for every file, in a fixed order."""
    yield "wnids.txt", "".join(f"{w}\n" for w in wnids).encode()
    words = [(w, _class_name(c, w)) for c, w in enumerate(wnids)] + list(EXTRA_SYNSETS)
    yield "words.txt", "".join(f"{w}\t{name}\n" for w, name in sorted(words)).encode()

    image_id = 0  # global index over all images, used to pick the grayscale ones
    for class_index, (wnid, count) in enumerate(zip(wnids, train_counts, strict=True)):
        box_lines = []
        for i in range(count):
            name = f"{wnid}_{i}.JPEG"
            rng = np.random.default_rng([seed, SPLIT_TRAIN, class_index, i])
            data, box = _render_jpeg(class_index, rng, image_size, image_id in grayscale)
            yield f"train/{wnid}/images/{name}", data
            box_lines.append(f"{name}\t{_box_text(box)}\n")
            image_id += 1
        yield f"train/{wnid}/{wnid}_boxes.txt", "".join(box_lines).encode()

    annotations = []
    for k, class_index in enumerate(val_classes.tolist()):
        name = f"val_{k}.JPEG"
        rng = np.random.default_rng([seed, SPLIT_VAL, k])
        data, box = _render_jpeg(class_index, rng, image_size, image_id in grayscale)
        yield f"val/images/{name}", data
        annotations.append(f"{name}\t{wnids[class_index]}\t{_box_text(box)}\n")
        image_id += 1
    yield "val/val_annotations.txt", "".join(annotations).encode()

    for k in range(test_images):
        rng = np.random.default_rng([seed, SPLIT_TEST, k])
        class_index = int(rng.integers(len(wnids)))
        data, _ = _render_jpeg(class_index, rng, image_size, image_id in grayscale)
        yield f"test/images/test_{k}.JPEG", data
        image_id += 1


def _box_text(box: tuple[int, int, int, int]) -> str:
    return "\t".join(str(v) for v in box)


def _write_zip(output: Path, files: Iterator[tuple[str, bytes]]) -> None:
    """Write all files under `tiny-imagenet-200/` into a zip, atomically (temp file + os.replace)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED) as archive:
            dirs_written: set[str] = set()
            for rel_path, data in files:
                parts = f"{ROOT_NAME}/{rel_path}".split("/")
                for depth in range(1, len(parts)):  # directory entries, as in the real zip
                    directory = "/".join(parts[:depth]) + "/"
                    if directory not in dirs_written:
                        archive.writestr(_zip_entry(directory, stat.S_IFDIR | ZIP_DIR_MODE), b"")
                        dirs_written.add(directory)
                archive.writestr(_zip_entry("/".join(parts), stat.S_IFREG | ZIP_FILE_MODE), data)
        os.chmod(tmp_name, FILE_MODE & ~_umask())  # mkstemp made it 0600
        os.replace(tmp_name, output)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _zip_entry(name: str, mode: int) -> zipfile.ZipInfo:
    """A zip entry with Unix permissions (zipfile's default 0600, directories without x, is unreadable when
    a non-root user unzips it)."""
    info = zipfile.ZipInfo(name, ZIP_DATE_TIME)
    info.create_system = 3  # Unix: external_attr's high bits are the mode
    info.external_attr = mode << 16 | (MSDOS_DIRECTORY if stat.S_ISDIR(mode) else 0)
    return info


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_directory(output: Path, files: Iterator[tuple[str, bytes]]) -> Path:
    """Write all files into `output/tiny-imagenet-200/`, built in a temp dir and renamed into place (an
    existing tree, which the caller allowed to replace, is removed once the new one is complete)."""
    target = output / ROOT_NAME
    output.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(dir=output, prefix=f".{ROOT_NAME}."))
    old = None
    try:
        os.chmod(tmp_root, DIR_MODE & ~_umask())  # mkdtemp made it 0700
        for rel_path, data in files:
            path = tmp_root / rel_path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if target.exists() or target.is_symlink():
            old = Path(tempfile.mkdtemp(dir=output, prefix=f".{ROOT_NAME}.old."))
            os.replace(target, old / ROOT_NAME)
        os.replace(tmp_root, target)
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return output




# --- rendering -------------------------------------------------------------------------------------------

# Palette slots of an object's parts. Every image draws its own colours, the same way for all classes.
BODY, ACCENT, DETAIL = 0, 1, 2


@dataclass(frozen=True)
class Part:
    """One filled primitive of an object, in the object's upright frame.

    Coordinates are (u, v): u toward the object's front, v up, in units of the object's size (every object
    fits in [-0.5, 0.5]²). Kinds and their params: "ellipse" (cu, cv, ru, rv); "dome", the upper half of
    that ellipse; "box" (u0, v0, u1, v1); "polygon" (u0, v0, u1, v1, ...), convex, either winding.
    """

    kind: str
    params: tuple[float, ...]
    slot: int


# The downstream pair: the same kinds of parts, different shapes. A fish is long and flat with a fin on top;
# a duck is a round body low down with a head on a neck above its front.
FISH_PARTS = (
    Part("ellipse", (0.06, 0.0, 0.36, 0.15), BODY),  # long horizontal body
    Part("polygon", (-0.22, 0.0, -0.48, 0.18, -0.48, -0.18), BODY),  # tail fin at the back
    Part("polygon", (-0.16, 0.11, 0.14, 0.11, -0.12, 0.3), ACCENT),  # dorsal fin on top
    Part("polygon", (-0.02, -0.12, 0.1, -0.12, -0.04, -0.2), ACCENT),  # small fin below
    Part("ellipse", (0.28, 0.04, 0.03, 0.03), DETAIL),  # eye, above the midline
)
DUCK_PARTS = (
    Part("ellipse", (-0.08, -0.2, 0.32, 0.2), BODY),  # round body, low
    Part("polygon", (-0.32, -0.12, -0.46, 0.02, -0.24, -0.04), BODY),  # tail tip, raised at the back
    Part("box", (0.08, -0.12, 0.2, 0.16), BODY),  # neck
    Part("ellipse", (0.15, 0.24, 0.14, 0.14), BODY),  # head on top
    Part("polygon", (0.26, 0.29, 0.26, 0.18, 0.44, 0.22), ACCENT),  # beak pointing forward
    Part("ellipse", (0.19, 0.28, 0.034, 0.034), DETAIL),  # eye (the same size as the fish's, once scaled)
)
# The other classes: upright shapes sharing those parts.
GENERIC_PARTS: dict[str, tuple[Part, ...]] = {
    "snowman": (  # the duck's round body and head, stacked
        Part("ellipse", (0.0, -0.2, 0.28, 0.28), BODY),
        Part("ellipse", (0.0, 0.22, 0.17, 0.17), BODY),
        Part("polygon", (0.12, 0.26, 0.12, 0.18, 0.32, 0.22), ACCENT),  # nose
        Part("box", (-0.13, 0.37, 0.13, 0.47), ACCENT),  # hat
        Part("ellipse", (0.06, 0.28, 0.03, 0.03), DETAIL),
    ),
    "sailboat": (  # a triangular fin as a sail above a hull
        Part("polygon", (-0.46, -0.2, 0.46, -0.2, 0.32, -0.42, -0.32, -0.42), BODY),  # hull
        Part("box", (-0.03, -0.2, 0.02, 0.46), DETAIL),  # mast
        Part("polygon", (0.05, -0.14, 0.05, 0.44, 0.38, -0.14), ACCENT),  # mainsail
        Part("polygon", (-0.05, -0.14, -0.05, 0.34, -0.26, -0.14), ACCENT),  # jib
    ),
    "submarine": (  # the fish's long body with a tower on top
        Part("ellipse", (0.0, -0.1, 0.46, 0.18), BODY),
        Part("box", (-0.1, 0.04, 0.1, 0.26), ACCENT),  # tower
        Part("box", (0.0, 0.26, 0.03, 0.4), DETAIL),  # periscope
        Part("polygon", (-0.4, -0.1, -0.5, 0.06, -0.5, -0.26), ACCENT),  # rudder
    ),
    "tree": (  # a round crown on a trunk
        Part("box", (-0.07, -0.48, 0.07, -0.05), ACCENT),
        Part("ellipse", (0.0, 0.14, 0.32, 0.32), BODY),
    ),
    "house": (  # a triangular roof on walls
        Part("box", (-0.36, -0.45, 0.36, 0.05), BODY),
        Part("polygon", (-0.46, 0.05, 0.46, 0.05, 0.0, 0.45), ACCENT),
        Part("box", (-0.2, -0.45, -0.06, -0.2), DETAIL),  # door, off-centre
    ),
    "mushroom": (  # a dome on a stem
        Part("box", (-0.1, -0.45, 0.1, 0.0), ACCENT),
        Part("dome", (0.0, -0.02, 0.46, 0.42), BODY),
    ),
    "bottle": (  # a round body with a neck on top
        Part("ellipse", (0.0, -0.2, 0.26, 0.26), BODY),
        Part("box", (-0.07, 0.0, 0.07, 0.35), BODY),
        Part("box", (-0.1, 0.33, 0.1, 0.45), ACCENT),
    ),
    "rocket": (  # a bar with a pointed nose on top and fins at the bottom
        Part("box", (-0.12, -0.35, 0.12, 0.18), BODY),
        Part("polygon", (-0.12, 0.18, 0.12, 0.18, 0.0, 0.48), ACCENT),
        Part("polygon", (-0.12, -0.12, -0.12, -0.35, -0.3, -0.46), ACCENT),
        Part("polygon", (0.12, -0.12, 0.12, -0.35, 0.3, -0.46), ACCENT),
        Part("ellipse", (0.0, 0.0, 0.06, 0.06), DETAIL),  # window
    ),
}
GENERIC_SHAPES = tuple(GENERIC_PARTS)

# Object placement (fractions of the image side; angles in degrees). Large objects: at 32 px their shape
# is drawn with enough pixels for a small network to read which way is up within a few hundred steps.
# Every class covers the same share of the image in distribution (its unit square scaled to that area), so
# the amount of object colour in an image says nothing about the class.
OBJECT_AREA_RANGE = (0.2, 0.28)
AREA_GRID = 200  # samples per side of the unit square when measuring a class's area
STRETCH_RANGE = (0.95, 1.05)  # independent scale of each object axis
MAX_TILT_DEG = 8.0
CENTRE_JITTER = 0.06  # object centre: image centre + up to this fraction of the image side, each axis
NOISE_STD_RANGE = (2.0, 7.0)  # per-pixel noise, after downsampling

# Palette: a light background and a dark object, each channel uniform in its range, drawn per image the same
# way for every class. The object stands out by brightness alone, in no direction in particular. Body and
# accent parts share the object colour: a second colour would put each class's accent area (a fish's fins,
# a duck's beak) into the colour histogram.
BACKGROUND_RANGE = (170.0, 255.0)
OBJECT_RANGE = (0.0, 110.0)
DETAIL_COLOUR = np.array([245.0, 245.0, 240.0])  # eyes, windows, doors: light on the dark object


def _class_parts(class_index: int) -> tuple[Part, ...]:
    if class_index == 0:
        return FISH_PARTS
    if class_index == 1:
        return DUCK_PARTS
    return GENERIC_PARTS[GENERIC_SHAPES[(class_index - 2) % len(GENERIC_SHAPES)]]


def _render_jpeg(class_index: int, rng: np.random.Generator, size: int,
                 grayscale: bool) -> tuple[bytes, tuple[int, int, int, int]]:
    """Render one scene and encode it as JPEG; returns the bytes and the object's box (inclusive pixels)."""
    pixels, box = render_scene(class_index, rng, size)
    image = Image.fromarray(pixels, "RGB")
    if grayscale:
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), box


def render_scene(class_index: int, rng: np.random.Generator,
                 size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Render a `size`x`size` RGB uint8 scene with the object of `class_index`, and its bounding box."""
    big = size * SUPERSAMPLE
    centres = np.arange(big, dtype=np.float32) + 0.5
    xs, ys = centres[None, :], centres[:, None]  # pixel centres (x right, y down), broadcast to (big, big)
    background, palette = _palette(rng)

    canvas = np.broadcast_to(background, (big, big, 3))
    u, v = _object_frame(rng, big, xs, ys, _unit_area(class_index))
    silhouette = np.zeros((big, big), bool)
    for part in _class_parts(class_index):
        mask = _part_mask(part, u, v)
        canvas = np.where(mask[..., None], palette[part.slot], canvas)
        silhouette |= mask

    small = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    small = small + rng.normal(0.0, rng.uniform(*NOISE_STD_RANGE), small.shape)
    pixels = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    return pixels, _box(silhouette, size)


def _palette(rng: np.random.Generator) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The background colour and the (body, accent, detail) colours: one distribution for every class."""
    background = rng.uniform(*BACKGROUND_RANGE, 3)
    body = rng.uniform(*OBJECT_RANGE, 3)
    return background, (body, body, DETAIL_COLOUR)


@functools.cache
def _unit_area(class_index: int) -> float:
    """The share of its unit square that the class's object covers."""
    u, v = np.meshgrid((np.arange(AREA_GRID) + 0.5) / AREA_GRID - 0.5, (np.arange(AREA_GRID) + 0.5) / AREA_GRID - 0.5)
    covered = np.zeros(u.shape, bool)
    for part in _class_parts(class_index):
        covered |= _part_mask(part, u, v)
    return float(covered.mean())


def _object_frame(rng: np.random.Generator, big: int, xs: np.ndarray, ys: np.ndarray,
                  unit_area: float) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's (u, v) in a randomly placed, scaled, stretched, tilted and mirrored object frame, scaled so
    that the object covers a share of the image drawn from OBJECT_AREA_RANGE."""
    side = np.sqrt(rng.uniform(*OBJECT_AREA_RANGE) / unit_area) * big
    ox, oy = big / 2 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, 2) * big
    tilt = np.deg2rad(rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG))
    stretch_u, stretch_v = rng.uniform(*STRETCH_RANGE, 2) * side
    facing = 1.0 if rng.uniform() < 0.5 else -1.0
    dx, dy = xs - ox, oy - ys  # dy points up
    cos, sin = np.cos(tilt), np.sin(tilt)
    u = facing * (cos * dx + sin * dy) / stretch_u
    v = (cos * dy - sin * dx) / stretch_v
    return u, v


def _part_mask(part: Part, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pixels inside one part."""
    p = part.params
    if part.kind in ("ellipse", "dome"):
        cu, cv, ru, rv = p
        inside = ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0
        return inside & (v >= cv) if part.kind == "dome" else inside
    if part.kind == "box":
        u0, v0, u1, v1 = p
        return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)
    if part.kind == "polygon":
        corners = np.asarray(p, dtype=np.float32).reshape(-1, 2)
        start, edge = corners, np.roll(corners, -1, axis=0) - corners
        cross = (edge[:, 0, None, None] * (v - start[:, 1, None, None])
                 - edge[:, 1, None, None] * (u - start[:, 0, None, None]))
        return (cross >= 0).all(axis=0) | (cross <= 0).all(axis=0)
    raise ValueError(f"unknown part kind {part.kind!r}")


def _box(silhouette: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """The object's bounding box in output pixels (inclusive), from its supersampled silhouette."""
    rows, cols = np.flatnonzero(silhouette.any(axis=1)), np.flatnonzero(silhouette.any(axis=0))
    if not len(rows):  # cannot happen: the object centre is inside the image; a whole-image box keeps the file valid
        return 0, 0, size - 1, size - 1
    x0, x1 = cols[0] // SUPERSAMPLE, cols[-1] // SUPERSAMPLE
    y0, y1 = rows[0] // SUPERSAMPLE, rows[-1] // SUPERSAMPLE
    return int(x0), int(y0), int(x1), int(y1)
