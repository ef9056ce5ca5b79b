"""The GPU code paths on CPU: mixed precision, LossScaleOptimizer and XLA through a whole tiny run."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from job.layout import RunLayout
from job.synth import make_synthetic_dataset
from tests.jobproc import job_args, run_job

pytestmark = pytest.mark.slow

# As small as the job allows: a few steps of each training (the first ones overflow float16 at the initial loss
# scale, 2**15, and are skipped while the scale halves), no colour baseline.
SMALLEST = (
    "runtime.mixed_precision='on'", "runtime.xla='on'",
    "pretext.epochs=1", "pretext.steps_per_epoch=6", "pretext.batch_images=8", "pretext.colour_order_weight=1.0",
    "finetune.epochs=1", "finetune.min_steps=6", "finetune.batch_size=8",
    "evaluate.label_fractions=[1.0]", "evaluate.scratch_baseline=false", "evaluate.colour_baseline=false",
    "evaluate.probe_steps=5",
)
# Faster XLA compiles on CPU (the compile is most of this test's time); INFO logs for XLA's compile line.
XLA_ENV = {"XLA_FLAGS": "--xla_backend_optimization_level=0", "TF_CPP_MIN_LOG_LEVEL": "0"}
XLA_COMPILED = "Compiled cluster using XLA"  # TensorFlow logs it once per process, at its first XLA compile


def _policies(keras_file) -> set[str]:
    """The dtype policies named in a .keras file's model config."""
    with zipfile.ZipFile(keras_file) as archive:
        config = archive.read("config.json").decode()
    return {policy for policy in ("mixed_float16", "float32") if f'"name": "{policy}"' in config}


def _checkpoint(directory) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(directory / "ckpt")))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def _optimizer_values(checkpoint: dict[str, np.ndarray], suffix: str) -> list[float]:
    return [float(v) for name, v in checkpoint.items() if name.startswith("optimizer0/") and suffix in name]


def test_mixed_precision_loss_scaling_and_xla_run_end_to_end(tmp_path):
    data = tmp_path / "data.zip"
    make_synthetic_dataset(data, classes=4, per_class=4, downstream_per_class=8, val_per_class=2, image_size=32)
    output, cache = tmp_path / "run", tmp_path / "cache"
    # Two processes, so that each stage's XLA compile is logged: pretrain, then finetune and evaluate.
    for command in ("pretrain", "run"):
        result = run_job(job_args(command, data, output, cache, *SMALLEST), **XLA_ENV)
        assert result.returncode == 0, result.stderr[-3000:]
        assert XLA_COMPILED in result.stderr, f"{command}: no XLA compile"
    layout = RunLayout(output)
    metrics = json.loads(layout.metrics.read_text())
    assert 0.0 <= metrics["downstream"]["val_accuracy"] <= 1.0
    assert 0.0 <= metrics["pretext"]["val_colour_order_accuracy"] <= 1.0  # t4's colour-order head, in float16

    # Mixed precision in both stages: both exported models compute in float16.
    assert "mixed_float16" in _policies(layout.backbone)
    assert "mixed_float16" in _policies(layout.classifier)

    # A LossScaleOptimizer in both stages; downstream, one over the two groups (backbone and head).
    pretext = _checkpoint(layout.pretext)
    downstream = _checkpoint(layout.downstream("pretrained", "finetune", 1.0, 0))
    for checkpoint in (pretext, downstream):
        scales = _optimizer_values(checkpoint, "dynamic_scale")
        assert len(scales) == 1 and 0.0 < scales[0] <= 2.0**15, checkpoint.keys()
    groups = {name.split("/")[2] for name in downstream if name.startswith("optimizer0/inner_optimizer/group")}
    assert groups == {"group0", "group1"}, downstream.keys()
    # Steps were applied, not only skipped: the inner optimizers' iterations count the applied ones.
    assert _optimizer_values(pretext, "inner_optimizer/_iterations")[0] >= 1
    applied = [float(downstream[f"optimizer0/inner_optimizer/{g}/_iterations/.ATTRIBUTES/VARIABLE_VALUE"])
               for g in sorted(groups)]
    assert applied[0] == applied[1] >= 1, applied
