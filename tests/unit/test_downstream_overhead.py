"""What a downstream run no longer pays: TensorFlow's kernel cache cleared by reseeding (every traced function,
the train step first, optimised again on its next call)."""

from __future__ import annotations

import random
import types

import keras
import numpy as np
import pytest
from tensorflow.python import pywrap_tfe

from job import downstream
from job.config import load_config


def _no_cache_clearing(monkeypatch) -> None:
    def clear(*args):
        pytest.fail("TensorFlow's kernel cache was cleared (tf.random.set_seed)")

    monkeypatch.setattr(pywrap_tfe, "TFE_ContextClearCaches", clear)


def _host_draws() -> tuple[float, float]:
    return random.random(), float(np.random.random())


def test_reset_of_a_built_seed_seeds_like_set_random_seed_but_leaves_tensorflows_cache(monkeypatch):
    """Before, each reset called keras.utils.set_random_seed, whose tf.random.set_seed clears the kernel cache:
    the next train step call was optimised again (3-5 s a run on a CPU)."""
    ctx = types.SimpleNamespace(config=load_config("demo"), built={})
    weights = downstream._initial_weights(ctx, "finetune", 1)  # the demo's two seeds (0 and 1) are built at once
    assert {key for key in ctx.built if key.startswith("initial_weights/")} == {
        "initial_weights/finetune/0", "initial_weights/finetune/1"}
    keras.utils.set_random_seed(1)
    expected = _host_draws()

    assigned = []
    nets = types.SimpleNamespace(trained=types.SimpleNamespace(set_weights=assigned.append))
    learner = downstream.Learner(nets, groups=[], schedules=[], objective=None, initial_optimizer_state=[])
    keras.utils.set_random_seed(7)  # generators elsewhere: the reset must seed them again
    _no_cache_clearing(monkeypatch)
    learner.reset(ctx, downstream.SCRATCH, "finetune", 1, warmup_steps=0, total_steps=1)

    assert assigned == [weights]
    assert _host_draws() == expected


def test_the_first_build_leaves_the_generators_as_set_random_seed_and_one_build_do():
    """The other seeds are built first: the requested one's generators are as a build of it alone leaves them."""
    ctx = types.SimpleNamespace(config=load_config("demo"), built={})
    downstream._initial_weights(ctx, "finetune", 0)
    after_all = _host_draws()
    alone = types.SimpleNamespace(config=load_config("demo", ["finetune.seeds=1"]), built={})
    downstream._initial_weights(alone, "finetune", 0)
    assert _host_draws() == after_all
