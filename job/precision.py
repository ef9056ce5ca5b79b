"""Numerics of a run: mixed precision (the dtype policy), XLA compilation and bit-repeatable execution."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras
import tensorflow as tf

from job.config import RuntimeConfig
from job.distribute import Cluster

MIXED_POLICY = "mixed_float16"  # float16 compute, float32 variables; with dynamic loss scaling (job/train.py)
FLOAT_POLICY = "float32"
ON, AUTO = "on", "auto"  # runtime.mixed_precision and runtime.xla: "auto" is on with a GPU
# runtime.deterministic: independent ops run one at a time. With TensorFlow's default inter-op parallelism the
# backward pass's independent ops run concurrently and CPU round-off varied with their timing (Conv_1's kernel
# gradient first, ~1e-9), which the training amplified into different results by the second epoch.
DETERMINISTIC_INTER_OP_THREADS = 1


def _enabled(setting: str, cluster: Cluster) -> bool:
    return setting == ON or (setting == AUTO and cluster.has_gpu)


def mixed_precision(runtime: RuntimeConfig, cluster: Cluster) -> bool:
    """Whether runtime.mixed_precision turns float16 compute on for this cluster."""
    return _enabled(runtime.mixed_precision, cluster)


def use_xla(runtime: RuntimeConfig, cluster: Cluster) -> bool:
    """Whether runtime.xla compiles the train step for this cluster."""
    return _enabled(runtime.xla, cluster)


@contextlib.contextmanager
def dtype_policy(mixed: bool) -> Iterator[None]:
    """Inside, Keras builds layers with float16 compute (float32 variables) when `mixed`; float32 after."""
    keras.mixed_precision.set_global_policy(MIXED_POLICY if mixed else FLOAT_POLICY)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(FLOAT_POLICY)


def make_deterministic(seed: int) -> None:
    """runtime.deterministic: the same config and data give bit-identical results, uninterrupted or resumed.

    Call before TensorFlow runs anything. Op determinism (deterministic GPU kernels; ops without one raise),
    one inter-op thread (see DETERMINISTIC_INTER_OP_THREADS), and seeds for every random generator (op
    determinism refuses unseeded random ops). The input pipeline already is a function of (seed, epoch, step).
    """
    tf.config.experimental.enable_op_determinism()
    tf.config.threading.set_inter_op_parallelism_threads(DETERMINISTIC_INTER_OP_THREADS)
    keras.utils.set_random_seed(seed)
