"""A downstream run's seeded initial weights are built once per mode and seed, and are what a fresh build gives."""

from __future__ import annotations

import types

import keras
import numpy as np
import pytest

from job import downstream
from job.config import load_config


def test_initial_weights_are_a_fresh_seeded_build_made_once_per_seed(monkeypatch):
    """Before, every run's reset built a throwaway MobileNetV2 for them (seconds, and its garbage collection
    more: the gap after each downstream run)."""
    ctx = types.SimpleNamespace(config=load_config("demo", ["runtime.seed=3", "finetune.seeds=1"]), built={})
    keras.utils.set_random_seed(3)
    first = downstream._initial_weights(ctx, "finetune", 3)
    keras.utils.set_random_seed(3)
    layers = downstream.transfer_layers(ctx)
    fresh = downstream._networks(ctx.config.model, ctx.config.data.image_size, layers, "finetune").trained.get_weights()
    assert len(first) == len(fresh) and all(np.array_equal(a, b) for a, b in zip(first, fresh, strict=True))

    def build_again(*args):
        pytest.fail("built the networks again for a mode and seed already built")

    monkeypatch.setattr(downstream, "_networks", build_again)
    assert downstream._initial_weights(ctx, "finetune", 3) is first
