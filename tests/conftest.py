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


CLASS_NAMES = ["fish", "duck"]
TINY_MODEL_SIZE = 32
# An untrained MobileNetV2 at its initial BatchNorm statistics shrinks every image to the same features;
# a larger BN scale keeps them apart, so that the tiny model's predictions differ between images.
UNTRAINED_BN_GAMMA = 3.0
REFERENCE_IMAGES = 16


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding what finetune exports (config.json, model/classifier.keras and its SavedModel)
    for a tiny untrained classifier built with models/ (alpha 0.35, 32 px). Do not modify it."""
    import json

    import keras
    import numpy as np

    from job.config import load_config
    from job.layout import RunLayout
    from job.serving import export_classifier
    from models.backbone import build_backbone
    from models.heads import classifier_head

    layout = RunLayout(tmp_path_factory.mktemp("tiny_run"))
    keras.utils.set_random_seed(0)
    backbone = build_backbone(TINY_MODEL_SIZE, alpha=0.35, stem_stride=1)
    head = classifier_head(backbone.output_shape[-1], len(CLASS_NAMES))
    body = next(layer for layer in backbone.layers if isinstance(layer, keras.Model))
    for layer in body.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.gamma.assign(np.full(layer.gamma.shape, UNTRAINED_BN_GAMMA, np.float32))
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal(head.get_weights()[0].shape).astype(np.float32)
    reference = rng.integers(0, 256, (REFERENCE_IMAGES, TINY_MODEL_SIZE, TINY_MODEL_SIZE, 3)).astype(np.float32)
    features = backbone(reference).numpy()
    head.set_weights([kernel, -features.mean(0) @ kernel])  # centred logits: both classes get predicted
    pixels = keras.Input((TINY_MODEL_SIZE, TINY_MODEL_SIZE, 3), name="pixels")
    model = keras.Model(pixels, head(backbone(pixels)), name="classifier")
    config = load_config("demo", [f"data.image_size={TINY_MODEL_SIZE}", f"data.downstream_names={CLASS_NAMES}"])
    layout.config.write_text(json.dumps(config.to_dict()))
    layout.export.mkdir(parents=True)
    model.save(layout.classifier)
    export_classifier(layout.classifier, layout.classifier_savedmodel, CLASS_NAMES)
    return layout.root
