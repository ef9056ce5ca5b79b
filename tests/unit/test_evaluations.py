"""Tests for job.evaluations: the registry, what a config enables, the protocol's order and its assembly."""

from __future__ import annotations

import types

import numpy as np
import pytest

from job import evaluations
from job.config import EVALUATIONS, load_config
from job.downstream import PRETRAINED, S4L, SCRATCH, configured_seeds, finetune_seeds
from job.errors import JobError
from job.evaluations import BY_FRACTION, REGISTRY, RunSpec, enabled, training_order


def test_every_configurable_evaluation_is_registered_in_order():
    assert list(REGISTRY) == list(EVALUATIONS)
    assert load_config("demo").evaluate.evaluations == list(EVALUATIONS)


def test_the_list_and_the_boolean_switches_both_apply():
    names = [e.name for e in enabled(load_config("demo"))]
    assert names == ["linear_probe", "knn", "colour_baseline", "scratch_baseline", "label_efficiency"]
    config = load_config("cpu-real", ["evaluate.scratch_baseline=false",
                                      "evaluate.evaluations=['knn', 'depth_probe', 'scratch_baseline']"])
    assert [e.name for e in enabled(config)] == ["knn", "depth_probe"]


@pytest.mark.parametrize("listed, words", [("['knn', 'nope']", "has no evaluation 'nope'"),
                                            ("['knn', 'knn']", "names one twice")])
def test_a_bad_evaluation_list_is_one_error_naming_the_key(listed, words):
    with pytest.raises(JobError, match=rf"evaluate\.evaluations = .* {words}: list each at most once"):
        load_config("demo", [f"evaluate.evaluations={listed}"])


class _SeedInputs:
    """The shared inputs' seeds, fractions and run specs from a config, without data or networks."""

    def __init__(self, config):
        self.config, self.runs = config, {}
        self.seeds, self.fractions = finetune_seeds(config), sorted(set(config.evaluate.label_fractions))

    spec = evaluations.Inputs.spec
    specs = evaluations.Inputs.specs
    fraction_seeds = evaluations.Inputs.fraction_seeds
    accuracies = evaluations.Inputs.accuracies


def test_downstream_runs_train_in_the_order_the_protocol_always_used():
    """The finetune stage's runs, scratch at finetune.label_fraction, then per fraction pretrained, scratch, S4L:
    each once, whatever order evaluate.evaluations lists them in."""
    config = load_config("demo", ["evaluate.s4l=true", "finetune.label_fraction=1.0",
                                  "evaluate.evaluations=['s4l', 'label_efficiency', 'scratch_baseline']"])
    inputs = _SeedInputs(config)
    finetune = [RunSpec(PRETRAINED, 1.0, s, "finetune") for s in (0, 1)]
    wanted = finetune + [spec for e in enabled(config) for spec in e.runs(inputs)]
    order = [(s.init if s.mode != S4L else S4L, s.fraction, s.seed) for s in training_order(wanted, config)]
    assert order == [
        (PRETRAINED, 1.0, 0), (PRETRAINED, 1.0, 1), (SCRATCH, 1.0, 0), (SCRATCH, 1.0, 1),
        (PRETRAINED, 0.1, 0), (PRETRAINED, 0.1, 1), (SCRATCH, 0.1, 0), (SCRATCH, 0.1, 1), (S4L, 0.1, 0), (S4L, 0.1, 1),
        (S4L, 1.0, 0), (S4L, 1.0, 1),
    ]


class _FakeInputs(_SeedInputs):
    """The shared inputs without networks: the protocol's assembly and timing alone."""

    def __init__(self, ctx):
        super().__init__(ctx.config)
        self.ctx, self.layers = ctx, ["out_relu"]


def _fake_train(trained: list):
    def train(ctx, init, fraction, seed, mode=None):
        trained.append((init, fraction, seed, mode))
        accuracy = {PRETRAINED: 0.9, SCRATCH: 0.7}[init] - (0.1 if mode == S4L else 0.0) - (fraction < 1) * 0.2
        return {"val_accuracy": accuracy, "seed": seed, "wall_seconds": 2.0 if init == SCRATCH else 1.0}

    return train


def test_the_protocol_assembles_rows_results_and_timing_from_the_evaluations(monkeypatch):
    config = load_config("demo", ["evaluate.s4l=true", "finetune.label_fraction=1.0", "evaluate.evaluations="
                                  "['s4l', 'label_efficiency', 'scratch_baseline', 'colour_baseline']"])
    trained = []
    monkeypatch.setattr(evaluations, "Inputs", _FakeInputs)
    monkeypatch.setattr(evaluations, "train_downstream", _fake_train(trained))
    monkeypatch.setattr(evaluations, "transfer_selection", lambda ctx: None)
    monkeypatch.setattr(evaluations.ColourBaseline, "run",
                        lambda self, inputs: {"colour_histogram": [0.5, 0.5], BY_FRACTION: {0.1: [0.4], 1.0: [0.5]}})
    done = evaluations.run_protocol(types.SimpleNamespace(config=config))

    assert len(trained) == len(set(trained)) == 12  # 2 seeds x (finetune, scratch, 2 fractions x 3 kinds) - reused
    assert [list(row) for row in done["label_efficiency"]] == [
        ["fraction", "pretrained", "scratch", "colour_histogram", "s4l"]] * 2
    assert done["label_efficiency"][0] == {"fraction": 0.1, "pretrained": pytest.approx([0.7, 0.7]),
                                           "scratch": pytest.approx([0.5, 0.5]), "colour_histogram": [0.4],
                                           "s4l": pytest.approx([0.6, 0.6])}
    assert [r["seed"] for r in done["finetune"]] == [0, 1] and [r["val_accuracy"] for r in done["scratch"]] == [0.7] * 2
    assert done["colour_histogram"] == [0.5, 0.5]
    timing = done["timing"]
    assert (timing["downstream_pretrained_s"], timing["downstream_scratch_s"], timing["downstream_s4l_s"]) == (
        4.0, 8.0, 4.0)
    assert timing["downstream_s"] == 16.0
    assert set(timing["evaluations"]) == {"s4l", "label_efficiency", "scratch_baseline", "colour_baseline"}
    entries = evaluations.metrics(done)
    assert entries["baseline.scratch_val_accuracy"] == pytest.approx(0.7)
    assert entries["baseline.colour_histogram_val_accuracy"] == 0.5
    assert entries["downstream.knn_val_accuracy"] is None and entries["pretext.linear_probe_200_top1"] is None


def test_each_label_fraction_trains_and_reports_its_own_number_of_seeds(monkeypatch):
    """evaluate.label_fraction_seeds: 3 seeds at 10% of the labels, 1 at 100%; the finetune stage and the scratch
    baseline beside it keep finetune.seeds (2). Every row's columns hold one score per seed of that fraction."""
    config = load_config("demo", ["finetune.label_fraction=1.0", "evaluate.label_fractions=[0.1, 1.0]",
                                  "evaluate.label_fraction_seeds=[3, 1]", "evaluate.evaluations="
                                  "['label_efficiency', 'scratch_baseline', 'colour_baseline']"])
    trained, probed = [], []
    monkeypatch.setattr(evaluations, "Inputs", _FakeInputs)
    monkeypatch.setattr(evaluations, "train_downstream", _fake_train(trained))
    monkeypatch.setattr(evaluations, "transfer_selection", lambda ctx: None)
    monkeypatch.setattr(evaluations, "colour_histograms", lambda images, bins: images)
    labels = np.arange(40) % 2
    monkeypatch.setattr(_FakeInputs, "split", types.SimpleNamespace(
        train_images=np.zeros((40, 1)), train_labels=labels, val_images=np.zeros((4, 1)), val_labels=labels[:4]),
        raising=False)
    monkeypatch.setattr(_FakeInputs, "probe", {}, raising=False)

    def probe(train, train_labels, val, val_labels, classes, seed):
        probed.append((len(train_labels), seed))
        return 0.5 + seed / 100

    monkeypatch.setattr(evaluations, "linear_probe", probe)
    done = evaluations.run_protocol(types.SimpleNamespace(config=config))

    assert sorted(set(trained)) == sorted(
        [(PRETRAINED, 1.0, s, "finetune") for s in (0, 1)] + [(SCRATCH, 1.0, s, "finetune") for s in (0, 1)]
        + [(init, 0.1, s, "finetune") for init in (PRETRAINED, SCRATCH) for s in (0, 1, 2)])
    assert len(trained) == len(set(trained))  # the 100% rows' seed 0 is the finetune stage's run
    low, full = done["label_efficiency"]
    assert (low["pretrained"], low["scratch"]) == (pytest.approx([0.7] * 3), pytest.approx([0.5] * 3))
    assert (full["pretrained"], full["scratch"]) == (pytest.approx([0.9]), pytest.approx([0.7]))
    assert low["colour_histogram"] == pytest.approx([0.5, 0.51, 0.52]) and full["colour_histogram"] == [0.5]
    assert done["colour_histogram"] == pytest.approx([0.5, 0.51])  # beside the finetune stage: its 2 seeds
    assert sorted(set(probed)) == [(4, 0), (4, 1), (4, 2), (40, 0), (40, 1)]  # each subset probed once
    assert len(probed) == len(set(probed))
    assert configured_seeds(config) == [0, 1, 2]


@pytest.mark.parametrize("seeds", ["[3]", "[3, 0]", "[3, 2, 1]"])
def test_label_fraction_seeds_need_one_positive_count_per_fraction(seeds):
    with pytest.raises(JobError, match=r"evaluate\.label_fraction_seeds = .* one positive count for each of "
                                       r"evaluate\.label_fractions"):
        load_config("demo", ["evaluate.label_fractions=[0.1, 1.0]", f"evaluate.label_fraction_seeds={seeds}"])
    assert load_config("demo", ["evaluate.label_fraction_seeds=[]"]).evaluate.label_fraction_seeds == []
