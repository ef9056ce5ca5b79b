"""The layer names of keras.applications.MobileNetV2, without importing Keras (for config validation).

They do not depend on alpha or the input size; tests/unit/test_backbone.py checks them against Keras.
"""

from __future__ import annotations

BLOCKS = 16  # inverted-residual blocks after the first (block_1 … block_16)
PADDED_BLOCKS = (1, 3, 6, 13)  # strided blocks: a ZeroPadding2D before their depthwise convolution
RESIDUAL_BLOCKS = (2, 4, 5, 7, 8, 9, 11, 12, 14, 15)  # blocks with a skip connection (block_N_add)
_BLOCK_PARTS = ("expand", "expand_BN", "expand_relu", "depthwise", "depthwise_BN", "depthwise_relu", "project",
                "project_BN")


def mobilenet_v2_layer_names() -> frozenset[str]:
    """Every layer name of MobileNetV2's body except its input (e.g. block_5_add, out_relu)."""
    names = {"Conv1", "bn_Conv1", "Conv1_relu", "Conv_1", "Conv_1_bn", "out_relu"}
    names |= {f"expanded_conv_{part}" for part in ("depthwise", "depthwise_BN", "depthwise_relu", "project",
                                                   "project_BN")}
    for block in range(1, BLOCKS + 1):
        names |= {f"block_{block}_{part}" for part in _BLOCK_PARTS}
    names |= {f"block_{block}_pad" for block in PADDED_BLOCKS}
    names |= {f"block_{block}_add" for block in RESIDUAL_BLOCKS}
    return frozenset(names)


def stage_of(layer_name: str) -> int:
    """Where a layer sits in MobileNetV2's body, by block: 0 the stem, 1 `expanded_conv`, N + 1 `block_N_*`,
    BLOCKS + 2 the final 1x1 convolution and `out_relu`. Layers of one block share a stage."""
    if layer_name.startswith("block_"):
        return int(layer_name.split("_")[1]) + 1
    if layer_name.startswith("expanded_conv"):
        return 1
    if layer_name.startswith("Conv1") or layer_name == "bn_Conv1":
        return 0
    return BLOCKS + 2
