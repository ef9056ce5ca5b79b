"""How many samples/s a GPU's pretext train step consumes: the rate the input pipeline has to sustain.

The job is TensorFlow; a machine with a GPU but no TensorFlow can still measure the step through
Keras 3's JAX backend, on the same network (`models/backbone.py` is plain Keras): MobileNetV2, the
rotation head and the 200-way online probe on stop-gradient features, AdamW, uint8 pixels already on
the device. It is a proxy: XLA compiles both backends' steps, but the kernels differ.

    KERAS_BACKEND=jax python infra/gpu_appetite.py --json

Prints one row per model setting: the median of `--repeats` timed runs of `--steps` steps, after a
compiled warm-up. Compare `samples_per_sec` with `pipeline_samples_per_sec` of `python -m job bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from models.backbone import build_backbone  # noqa: E402
from models.heads import NUM_ROTATIONS, classifier_head, rotation_head  # noqa: E402

IMAGE_SIZE = 64
PROBE_CLASSES = 200

# (name, alpha, stem stride, images per step): the t4 config, its stride-2 variant, cpu-real's network.
SETTINGS = (
    ("t4", 1.0, 1, 256),
    ("t4-stem2", 1.0, 2, 256),
    ("cpu-real", 0.5, 2, 64),
)


@dataclass
class Row:
    setting: str
    alpha: float
    stem_stride: int
    precision: str
    batch_samples: int
    compile_seconds: float
    samples_per_sec: float
    step_ms: float
    loss_finite: bool  # random pixels and labels: only the speed is meaningful, but a NaN step is still timed


def pretext_model(alpha: float, stem_stride: int) -> keras.Model:
    backbone = build_backbone(IMAGE_SIZE, alpha=alpha, stem_stride=stem_stride)
    dim = backbone.output_shape[-1]
    pixels = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="pixels")
    features = backbone(pixels)
    rotation = rotation_head(dim)(features)
    probe = classifier_head(dim, PROBE_CLASSES, name="online_probe")(keras.ops.stop_gradient(features))
    return keras.Model(pixels, [rotation, probe])


def measure(setting: str, alpha: float, stem_stride: int, images: int, precision: str, steps: int,
            repeats: int) -> Row:
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    model = pretext_model(alpha, stem_stride)
    optimizer = keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=0.05)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss_and_state(trainable, non_trainable, pixels, rotations, labels):
        (rotation, probe), non_trainable = model.stateless_call(trainable, non_trainable, pixels, training=True)
        return loss_fn(rotations, rotation) + loss_fn(labels, probe), non_trainable

    grad_fn = jax.value_and_grad(loss_and_state, has_aux=True)

    @jax.jit
    def train_step(state, pixels, rotations, labels):
        trainable, non_trainable, opt_vars = state
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable, pixels, rotations, labels)
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return loss, (trainable, non_trainable, opt_vars)

    samples = images * NUM_ROTATIONS
    rng = np.random.default_rng(0)
    pixels = jax.device_put(rng.integers(0, 256, (samples, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    rotations = jax.device_put(np.tile(np.arange(NUM_ROTATIONS, dtype=np.int32), images))
    labels = jax.device_put(rng.integers(0, PROBE_CLASSES, samples).astype(np.int32))
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
    )
    start = time.perf_counter()
    loss, state = train_step(state, pixels, rotations, labels)
    loss.block_until_ready()
    compile_seconds = time.perf_counter() - start
    for _ in range(3):  # warm-up after compiling
        loss, state = train_step(state, pixels, rotations, labels)
    loss.block_until_ready()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            loss, state = train_step(state, pixels, rotations, labels)
        loss.block_until_ready()
        rates.append(steps * samples / (time.perf_counter() - start))
    rate = statistics.median(rates)
    keras.mixed_precision.set_global_policy("float32")
    return Row(setting, alpha, stem_stride, precision, samples, round(compile_seconds, 1), round(rate, 1),
               round(1000 * samples / rate, 2), bool(np.isfinite(float(loss))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", nargs="+", default=["mixed_bfloat16", "float32"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=[s[0] for s in SETTINGS])
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"# {device.platform}: {getattr(device, 'device_kind', device)}, jax {jax.__version__}, "
          f"keras {keras.__version__}", flush=True)
    for setting, alpha, stem, images in SETTINGS:
        if setting not in args.settings:
            continue
        for precision in args.precision:
            row = measure(setting, alpha, stem, images, precision, args.steps, args.repeats)
            if args.json:
                print(json.dumps(asdict(row)), flush=True)
            else:
                print("  ".join(f"{k}={v}" for k, v in asdict(row).items()), flush=True)


if __name__ == "__main__":
    main()
