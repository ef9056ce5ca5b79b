"""Shared fixtures: small synthetic Tiny ImageNet datasets (zip and directory) and the real mini subset."""

from __future__ import annotations

from pathlib import Path

import pytest

from job.synth import make_synthetic_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
MINI_ZIP = REPO_ROOT.parent / "shared" / "data" / "tiny-imagenet-200-mini.zip"

# Small enough to decode in well under a second; grayscale_fraction is raised so that the train and val
# splits hold a few mode-L JPEGs (with the default 2% the only one may land in the test split).
SYNTH = {
    "classes": 4,
    "per_class": 8,
    "val_per_class": 3,
    "test_images": 2,
    "image_size": 32,
    "seed": 0,
    "grayscale_fraction": 0.1,
}


@pytest.fixture(scope="session")
def synth_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset as `synth.zip` (members under `tiny-imagenet-200/`). Do not modify it."""
    path = tmp_path_factory.mktemp("synth_zip") / "synth.zip"
    make_synthetic_dataset(path, **SYNTH)
    return path


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same dataset as `synth_zip`, as a directory holding `tiny-imagenet-200/`. Do not modify it."""
    path = tmp_path_factory.mktemp("synth_dir")
    make_synthetic_dataset(path, **SYNTH)
    return path


@pytest.fixture
def mini_zip() -> Path:
    """The real Tiny ImageNet mini subset from ../shared/data, or a clean skip when it is absent."""
    if not MINI_ZIP.is_file():
        pytest.skip(f"{MINI_ZIP} is not present")
    return MINI_ZIP
