"""finetune.min_crop_area: a downstream run's labelled batches are scaled crops when it is below 1, and plain
flips (with data.crop_padding = 0) when it is 1, for either initialisation."""

from __future__ import annotations

import numpy as np
import pytest

from job.config import load_config
from job.downstream import labelled_dataset_fn

IMAGES, SIZE, BATCH, STEPS = 8, 32, 4, 6


def _batches(min_crop_area: float) -> list[tuple[np.ndarray, np.ndarray]]:
    config = load_config("demo", ["data.crop_padding=0", f"finetune.min_crop_area={min_crop_area}"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (IMAGES, SIZE, SIZE, 3), dtype=np.uint8)
    # Each image's label is its index, so every augmented image names its source.
    make = labelled_dataset_fn(config, images, np.arange(IMAGES, dtype=np.int32), BATCH, STEPS)
    out = []
    for batch in make(range(1), 0, None):
        for image, source in zip(batch["images"].numpy(), batch["labels"].numpy(), strict=True):
            out.append((image[..., :3], images[source]))  # the pipeline's RGBX words, X dropped
    return out


def _is_flip_of(image: np.ndarray, source: np.ndarray) -> bool:
    return np.array_equal(image, source) or np.array_equal(image, source[:, ::-1])


def test_full_area_crops_without_padding_are_the_images_or_their_mirrors():
    pairs = _batches(1.0)
    assert len(pairs) == BATCH * STEPS
    assert all(_is_flip_of(image, source) for image, source in pairs)


@pytest.mark.parametrize("min_crop_area", [0.35, 0.6])
def test_scaled_crops_zoom_into_the_labelled_images(min_crop_area):
    pairs = _batches(min_crop_area)
    zoomed = [image for image, source in pairs if not _is_flip_of(image, source)]
    assert len(zoomed) > len(pairs) // 2  # a crop covers all the area only when its draw rounds to the full side
    for image, source in pairs:  # resized by nearest neighbour: every pixel is one of its source's
        assert image.shape == source.shape
        assert {tuple(p) for p in image.reshape(-1, 3)} <= {tuple(p) for p in source.reshape(-1, 3)}
