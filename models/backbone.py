"""MobileNetV2 backbone: uint8-range images in, pooled features out."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.error import URLError

import keras

from models.fused_batchnorm import FusedBatchNormalization

log = logging.getLogger(__name__)

STEM_LAYER = "Conv1"  # the first strided convolution of keras.applications.MobileNetV2
FEATURES_NAME = "features"
FINAL_LAYER = "out_relu"  # the last activation of keras.applications.MobileNetV2: the backbone's own features


class WeightsUnavailable(RuntimeError):
    """The ImageNet weights could not be downloaded (no network, a proxy, a firewall)."""


def build_backbone(
    image_size: int,
    alpha: float = 1.0,
    weights: str = "none",
    bn_momentum: float = 0.9,
    stem_stride: int = 2,
    input_scale: int = 1,
) -> keras.Model:
    """MobileNetV2 taking [B, S, S, 3] pixel values in [0, 255] and returning pooled features [B, C].

    `stem_stride=1` and `input_scale>1` both give the network a larger final feature map at 64 px
    (stride 32 leaves 2x2); `bn_momentum` replaces Keras' 0.999, which is too slow for short runs.
    """
    size = image_size * input_scale
    try:
        base = keras.applications.MobileNetV2(
            input_shape=(size, size, 3),
            alpha=alpha,
            include_top=False,
            weights="imagenet" if weights == "imagenet" else None,
            pooling=None,
        )
    except Exception as err:
        # keras.utils.get_file turns a URLError into a bare Exception("URL fetch failure on ...").
        if weights == "imagenet" and isinstance(err.__context__, (URLError, OSError)):
            raise WeightsUnavailable(str(err)) from err
        raise
    config = base.get_config()
    for layer in config["layers"]:
        if layer["class_name"] == "BatchNormalization":
            layer["config"]["momentum"] = bn_momentum
            # the same layer, its training step fused (models/fused_batchnorm.py)
            layer.update(class_name=FusedBatchNormalization.__name__, module=FusedBatchNormalization.__module__,
                         registered_name=keras.saving.get_registered_name(FusedBatchNormalization))
        if layer["config"].get("name") == STEM_LAYER:
            layer["config"]["strides"] = [stem_stride, stem_stride]
    body = keras.Model.from_config(config)
    body.set_weights(base.get_weights())

    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="to_unit_range")(inputs)
    if input_scale > 1:
        x = keras.layers.UpSampling2D(input_scale, interpolation="bilinear", name="upsample")(x)
    x = body(x)
    features = keras.layers.GlobalAveragePooling2D(name=FEATURES_NAME)(x)
    backbone = keras.Model(inputs, features, name="backbone")
    if weights not in ("none", "imagenet"):
        load_backbone_weights(backbone, Path(weights).expanduser())
    return backbone


def load_model(path: Path) -> keras.Model:
    """A `.keras` model this job saved (its MobileNetV2 layers registered for deserialisation)."""
    return keras.models.load_model(path, compile=False)


def load_backbone_weights(backbone: keras.Model, path: Path) -> None:
    """Load weights from a `.weights.h5` file or from the backbone inside a saved `.keras` model."""
    if path.suffix == ".keras":
        saved = load_model(path)
        source = saved if saved.name == "backbone" else saved.get_layer("backbone")
        backbone.set_weights(source.get_weights())
    else:
        backbone.load_weights(path)
    log.info("Loaded backbone weights from %s", path)


def _body(backbone: keras.Model) -> keras.Model:
    return next(layer for layer in backbone.layers if isinstance(layer, keras.Model))


def variables_through(backbone: keras.Model, layer_name: str) -> list:
    """The trainable variables of the MobileNetV2 layers from the input up to and including `layer_name`."""
    body = _body(backbone)
    names = [layer.name for layer in body.layers]
    if layer_name not in names:
        raise ValueError(f"MobileNetV2 has no layer named {layer_name}")
    return [v for layer in body.layers[: names.index(layer_name) + 1] for v in layer.trainable_weights]


def pooled_block_features(backbone: keras.Model, layer_names: list[str]) -> keras.Model:
    """pixels → [globally average-pooled output of each named MobileNetV2 layer], for probing by depth.

    Names are layers of keras.applications.MobileNetV2 (e.g. "block_5_add", "out_relu"); the backbone's own
    preprocessing (rescaling, upsampling) is applied first. The model shares the backbone's variables, and
    holds only the layers up to the deepest name.
    """
    body = _body(backbone)
    missing = [name for name in layer_names if name not in {layer.name for layer in body.layers}]
    if missing:
        raise ValueError(f"MobileNetV2 has no layer named {', '.join(missing)}")
    pooled = [keras.layers.GlobalAveragePooling2D()(body.get_layer(name).output) for name in layer_names]
    blocks = keras.Model(body.inputs, pooled, name="pooled_blocks")
    pixels = keras.Input(backbone.input_shape[1:], name="pixels")
    x = pixels
    for layer in backbone.layers[1:]:
        if layer is body:
            break
        x = layer(x)
    return keras.Model(pixels, blocks(x), name="backbone_by_depth")


def transfer_features(backbone: keras.Model, layers: list[str]) -> keras.Model:
    """pixels → the concatenated pooled outputs of `layers`: what a downstream head sees.

    `[FINAL_LAYER]` is the backbone itself; earlier or several layers give a model that shares the backbone's
    variables and stops at the deepest one (the layers after it are neither run nor trained).
    """
    if list(layers) == [FINAL_LAYER]:
        return backbone
    by_depth = pooled_block_features(backbone, list(layers))
    pooled = by_depth.outputs
    features = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate(name=FEATURES_NAME)(pooled)
    return keras.Model(by_depth.inputs, features, name="transfer_features")
