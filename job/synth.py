"""Small synthetic dataset in the exact original Tiny ImageNet layout (for demos and tests).

Every image is a little outdoor scene: a bright sky with a sun at the top, darker ground at the bottom and
one object standing on the ground with a shadow under it. The vertical layout makes rotation learnable; the
object (shape and colour family) identifies the class. The first two classes are the downstream pair: a fish
(orange body, triangular tail) and a duck (white/grey body, head with an orange beak).
"""

from __future__ import annotations

import colorsys
import io
import logging
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

ROOT_NAME = "tiny-imagenet-200"
JPEG_QUALITY = 90
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # fixed so zips are byte-identical for a seed
SUPERSAMPLE = 2  # draw at 2x and downsample, for anti-aliased edges
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

# Scene proportions (fractions of the image side).
HORIZON_RANGE = (0.45, 0.70)
SUN_Y_RANGE = (0.06, 0.25)
SUN_RADIUS_RANGE = (0.04, 0.08)
CLOUD_PROBABILITY = 0.5
OBJECT_WIDTH_RANGE = (0.28, 0.45)
OBJECT_BASE_RANGE = (0.15, 0.85)  # where the object's base sits between horizon and image bottom
SHADOW_HEIGHT = 0.12  # relative to object width
NOISE_STD_RANGE = (2.0, 7.0)
COLOUR_JITTER = 18.0

# Colours (RGB, 0-255).
SKY_TOP = np.array([205.0, 225.0, 250.0])  # brighter at the top
SKY_HORIZON = np.array([140.0, 170.0, 215.0])
SUN_COLOUR = (255, 248, 205)
CLOUD_COLOUR = (240, 242, 248)
GROUND_GREEN = np.array([70.0, 110.0, 45.0])
GROUND_BROWN = np.array([110.0, 85.0, 55.0])
GROUND_BOTTOM_DARKEN = 0.6  # ground colour multiplier at the bottom edge
GROUND_TEXTURE_STD = 6.0
GROUND_TEXTURE_CELL = 4  # texture cell side, in supersampled pixels
SHADOW_DARKEN = 0.4
FISH_ORANGE = np.array([235.0, 120.0, 30.0])
DUCK_WHITE = np.array([235.0, 235.0, 230.0])
DUCK_GREY_LEVEL_RANGE = (0.65, 1.0)
BEAK_ORANGE = np.array([245.0, 150.0, 20.0])
EYE_COLOUR = (20, 20, 25)
GOLDEN_RATIO = 0.618033988749895  # spreads generic class hues around the colour wheel

GENERIC_SHAPES = ("square", "triangle", "star", "bar", "ball", "diamond", "house", "mushroom")

Point = tuple[float, float]
Box = tuple[float, float, float, float]


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
    horizon = rng.uniform(*HORIZON_RANGE) * big
    ground = _jitter(rng, GROUND_GREEN + rng.uniform() * (GROUND_BROWN - GROUND_GREEN))
    canvas = Image.fromarray(_background(rng, big, horizon, ground), "RGB")
    draw = ImageDraw.Draw(canvas)
    _draw_sky_details(draw, rng, big)

    width = rng.uniform(*OBJECT_WIDTH_RANGE) * big
    base = horizon + rng.uniform(*OBJECT_BASE_RANGE) * (big - horizon)
    cx = rng.uniform(width * 0.6, big - width * 0.6)
    shadow_w, shadow_h = width * 0.55, width * SHADOW_HEIGHT
    shadow_colour = _rgb(ground * SHADOW_DARKEN)
    draw.ellipse((cx - shadow_w, base - shadow_h / 2, cx + shadow_w, base + shadow_h / 2), fill=shadow_colour)
    big_box = _draw_object(draw, rng, class_index, cx, base, width)

    small = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    small = small + rng.normal(0.0, rng.uniform(*NOISE_STD_RANGE), small.shape)
    pixels = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    x0, y0, x1, y1 = (v / SUPERSAMPLE for v in big_box)
    box = (_clip_px(x0, size), _clip_px(y0, size), _clip_px(x1, size), _clip_px(y1, size))
    return pixels, box


def _clip_px(value: float, size: int) -> int:
    return int(min(max(round(value), 0), size - 1))


def _jitter(rng: np.random.Generator, colour: np.ndarray, amount: float = COLOUR_JITTER) -> np.ndarray:
    return np.clip(colour + rng.uniform(-amount, amount, 3), 0, 255)


def _rgb(colour: np.ndarray) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in np.clip(np.rint(colour), 0, 255))
    return r, g, b


def _background(rng: np.random.Generator, big: int, horizon: float, ground: np.ndarray) -> np.ndarray:
    """Sky gradient (brightest at the top) above the horizon, ground darkening toward the bottom below it."""
    rows = np.arange(big, dtype=np.float32)[:, None] + 0.5
    sky_t = np.clip(rows / horizon, 0.0, 1.0)
    sky = _jitter(rng, SKY_TOP) * (1 - sky_t) + _jitter(rng, SKY_HORIZON) * sky_t
    ground_t = np.clip((rows - horizon) / (big - horizon), 0.0, 1.0)
    ground_rows = ground * (1 - (1 - GROUND_BOTTOM_DARKEN) * ground_t)
    column = np.where(rows < horizon, sky, ground_rows)  # (big, 3)
    image = np.broadcast_to(column[:, None, :], (big, big, 3)).astype(np.float32)
    cells = -(-big // GROUND_TEXTURE_CELL)
    texture = rng.normal(0.0, GROUND_TEXTURE_STD, (cells, cells, 1))  # coarse ground texture
    texture = texture.repeat(GROUND_TEXTURE_CELL, 0).repeat(GROUND_TEXTURE_CELL, 1)[:big, :big]
    image = image + np.where(rows[:, :, None] >= horizon, texture, 0.0)
    return np.clip(image, 0, 255).astype(np.uint8)


def _draw_sky_details(draw: ImageDraw.ImageDraw, rng: np.random.Generator, big: int) -> None:
    """A sun in the upper part of the sky at a random x, and sometimes a cloud."""
    radius = rng.uniform(*SUN_RADIUS_RANGE) * big
    sx, sy = rng.uniform(radius, big - radius), rng.uniform(*SUN_Y_RANGE) * big
    draw.ellipse((sx - radius, sy - radius, sx + radius, sy + radius), fill=SUN_COLOUR)
    if rng.uniform() < CLOUD_PROBABILITY:
        cx, cy = rng.uniform(0.1, 0.9) * big, rng.uniform(0.08, 0.3) * big
        w, h = rng.uniform(0.08, 0.16) * big, rng.uniform(0.03, 0.05) * big
        for dx in (-w * 0.5, 0.0, w * 0.5):
            draw.ellipse((cx + dx - w * 0.5, cy - h, cx + dx + w * 0.5, cy + h), fill=CLOUD_COLOUR)


def _draw_object(draw: ImageDraw.ImageDraw, rng: np.random.Generator, class_index: int, cx: float,
                 base: float, width: float) -> Box:
    """Draw the class object standing on `base` centred at `cx`; return its box at the drawing scale."""
    if class_index == 0:
        return _draw_fish(draw, rng, cx, base, width)
    if class_index == 1:
        return _draw_duck(draw, rng, cx, base, width)
    k = class_index - 2
    hue = (k * GOLDEN_RATIO + rng.uniform(-0.03, 0.03)) % 1.0
    sat, val = rng.uniform(0.55, 0.9), rng.uniform(0.55, 0.9)
    colour = _rgb(np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255)
    dark = _rgb(np.array(colour) * 0.6)
    return _SHAPE_DRAWERS[GENERIC_SHAPES[k % len(GENERIC_SHAPES)]](draw, cx, base, width, colour, dark)


def _draw_fish(draw: ImageDraw.ImageDraw, rng: np.random.Generator, cx: float, base: float,
               width: float) -> Box:
    """Orange elliptic body with a triangular tail behind it, facing left or right."""
    facing = 1 if rng.uniform() < 0.5 else -1
    colour = _rgb(_jitter(rng, FISH_ORANGE, 20.0))
    body_half_w, body_h = width * 0.36, width * rng.uniform(0.38, 0.5)
    body_cx = cx + facing * width * 0.14
    top, mid = base - body_h, base - body_h / 2
    draw.ellipse((body_cx - body_half_w, top, body_cx + body_half_w, base), fill=colour)
    tail_join = body_cx - facing * body_half_w * 0.85
    tail_end = cx - facing * width * 0.5
    draw.polygon([(tail_join, mid), (tail_end, mid - body_h * 0.45), (tail_end, mid + body_h * 0.45)],
                 fill=colour)
    eye_x, eye_r = body_cx + facing * body_half_w * 0.55, max(width * 0.035, 1.0)
    draw.ellipse((eye_x - eye_r, mid - body_h * 0.2 - eye_r, eye_x + eye_r, mid - body_h * 0.2 + eye_r),
                 fill=EYE_COLOUR)
    return cx - width * 0.5, top, cx + width * 0.5, base


def _draw_duck(draw: ImageDraw.ImageDraw, rng: np.random.Generator, cx: float, base: float,
               width: float) -> Box:
    """White/grey rounded body, smaller head circle above its front, orange beak pointing forward."""
    facing = 1 if rng.uniform() < 0.5 else -1
    colour = _rgb(_jitter(rng, DUCK_WHITE * rng.uniform(*DUCK_GREY_LEVEL_RANGE), 8.0))
    body_half_w, body_h = width * 0.4, width * rng.uniform(0.42, 0.5)
    body_cx = cx - facing * width * 0.05
    body_top = base - body_h
    draw.ellipse((body_cx - body_half_w, body_top, body_cx + body_half_w, base), fill=colour)
    back = body_cx - facing * body_half_w
    draw.polygon([(back, body_top + body_h * 0.45), (back - facing * width * 0.08, body_top + body_h * 0.1),
                  (back + facing * width * 0.15, body_top + body_h * 0.35)], fill=colour)  # tail tip
    head_r = width * 0.15
    head_x, head_y = body_cx + facing * body_half_w * 0.6, body_top - head_r * 0.5
    draw.ellipse((head_x - head_r, head_y - head_r, head_x + head_r, head_y + head_r), fill=colour)
    beak_root = head_x + facing * head_r * 0.8
    beak_tip = beak_root + facing * width * 0.16
    draw.polygon([(beak_root, head_y - head_r * 0.3), (beak_tip, head_y + head_r * 0.1),
                  (beak_root, head_y + head_r * 0.45)], fill=_rgb(_jitter(rng, BEAK_ORANGE, 12.0)))
    eye_r = max(width * 0.03, 1.0)
    eye_x = head_x + facing * head_r * 0.35
    draw.ellipse((eye_x - eye_r, head_y - head_r * 0.35 - eye_r, eye_x + eye_r, head_y - head_r * 0.35 + eye_r),
                 fill=EYE_COLOUR)
    left, right = sorted((back - facing * width * 0.08, beak_tip))
    return left, head_y - head_r, right, base


ShapeDrawer = Callable[[ImageDraw.ImageDraw, float, float, float, tuple, tuple], Box]


def _square(draw: ImageDraw.ImageDraw, cx: float, base: float, w: float, colour: tuple, dark: tuple) -> Box:
    box = (cx - w * 0.4, base - w * 0.8, cx + w * 0.4, base)
    draw.rectangle(box, fill=colour, outline=dark, width=2)
    return box


def _triangle(draw: ImageDraw.ImageDraw, cx: float, base: float, w: float, colour: tuple, dark: tuple) -> Box:
    draw.polygon([(cx - w * 0.5, base), (cx + w * 0.5, base), (cx, base - w * 0.9)], fill=colour)
    return cx - w * 0.5, base - w * 0.9, cx + w * 0.5, base


def _star(draw: ImageDraw.ImageDraw, cx: float, base: float, w: float, colour: tuple, dark: tuple) -> Box:
    outer, inner = w * 0.5, w * 0.2
    cy = base - outer * 0.81  # lowest points of an upright 5-point star sit at 0.81 * outer radius
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, outer, inner)
    points = [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles, strict=True)]
    draw.polygon(points, fill=colour, outline=dark)
    return cx - outer * 0.95, cy - outer, cx + outer * 0.95, base


def _bar(draw: ImageDraw.ImageDraw, cx: float, base: float, w: float, colour: tuple, dark: tuple) -> Box:
    half, top = w * 0.12, base - w * 1.2
    draw.rectangle((cx - half, top, cx + half, base), fill=colour)
    draw.rectangle((cx - half * 2, top, cx + half * 2, top + w * 0.12), fill=dark)  # cap on top
    return cx - half * 2, top, cx + half * 2, base


def _ball(draw: ImageDraw.ImageDraw, cx: float, base: float, w: float, colour: tuple, dark: tuple) -> Box:
    r = w * 0.4
    draw.ellipse((cx - r, base - 2 * r, cx + r, base), fill=colour)
    draw.ellipse((cx - r * 0.45, base - r * 1.65, cx - r * 0.05, base - r * 1.3), fill=(250, 250, 250))
    return cx - r, base - 2 * r, cx + r, base


def _diamond(draw: ImageDraw.ImageDraw, cx: float, base: float, w: float, colour: tuple, dark: tuple) -> Box:
    h = w * 1.0
    draw.polygon([(cx, base), (cx + w * 0.35, base - h * 0.6), (cx, base - h), (cx - w * 0.35, base - h * 0.6)],
                 fill=colour, outline=dark)
    return cx - w * 0.35, base - h, cx + w * 0.35, base


def _house(draw: ImageDraw.ImageDraw, cx: float, base: float, w: float, colour: tuple, dark: tuple) -> Box:
    wall_top, roof_top = base - w * 0.5, base - w * 0.9
    draw.rectangle((cx - w * 0.4, wall_top, cx + w * 0.4, base), fill=colour)
    draw.polygon([(cx - w * 0.5, wall_top), (cx + w * 0.5, wall_top), (cx, roof_top)], fill=dark)
    draw.rectangle((cx - w * 0.08, base - w * 0.25, cx + w * 0.08, base), fill=dark)  # door
    return cx - w * 0.5, roof_top, cx + w * 0.5, base


def _mushroom(draw: ImageDraw.ImageDraw, cx: float, base: float, w: float, colour: tuple, dark: tuple) -> Box:
    stem_top = base - w * 0.45
    draw.rectangle((cx - w * 0.1, stem_top, cx + w * 0.1, base), fill=(235, 225, 205))
    draw.chord((cx - w * 0.5, stem_top - w * 0.45, cx + w * 0.5, stem_top + w * 0.45), 180, 360, fill=colour)
    return cx - w * 0.5, stem_top - w * 0.45, cx + w * 0.5, base


_SHAPE_DRAWERS: dict[str, ShapeDrawer] = {
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "bar": _bar,
    "ball": _ball,
    "diamond": _diamond,
    "house": _house,
    "mushroom": _mushroom,
}
