"""The evaluate stage's protocol: evaluations of the pretrained backbone as plug-ins, registered by name.

An evaluation (big_vision's evaluators) is one small unit: built from the config, it names the downstream
runs it reads (`runs`), computes its results from the inputs the protocol shares (`run`: its keys of
evaluate/done.json) and reads them back as metrics.json entries (`metrics`: dotted keys, null where it did
not run). `evaluate.evaluations` lists those to run; the boolean switches of [evaluate] still turn theirs off.

The protocol: the shared inputs (the downstream split, the pretrained backbone and a random one seeded with
runtime.seed, the transfer layers); the evaluations that read no downstream run; every downstream run any of
them asked for, in one order whatever the list (the finetune stage's, the scratch baseline's at
finetune.label_fraction, then per label fraction: pretrained, scratch, S4L; seeds ascending); the others.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import keras
import numpy as np

from job import console
from job.config import EVALUATIONS, Config
from job.context import Context, build_configured_backbone, pretrained_backbone, probe_settings
from job.downstream import (
    PRETRAINED,
    S4L,
    SCRATCH,
    downstream_split,
    finetune_seeds,
    fraction_seeds,
    train_downstream,
    transfer_layers,
    transfer_selection,
)
from job.pipelines import stratified_subset
from job.probes import (
    CV_FOLDS,
    capped_knn_k,
    colour_histograms,
    cross_validated_accuracy,
    fold_ids,
    knn_accuracy,
    linear_probe,
    predict,
)
from models.backbone import pooled_block_features, transfer_features

log = logging.getLogger(__name__)

REGISTRY: dict[str, type[Evaluation]] = {}
BY_FRACTION = "by_fraction"  # an evaluation's column of the label-efficiency table: {fraction: [one per seed]}
ROW_COLUMNS = ("pretrained", "scratch", "colour_histogram")  # every row has these ([] when not run)
FROZEN = ("pretrained", "random")  # the backbones the frozen-feature probes compare
DOWNSTREAM_KINDS = (PRETRAINED, SCRATCH, S4L)  # timing.downstream_<kind>_s


def register(cls: type[Evaluation]) -> type[Evaluation]:
    """Class decorator: make an evaluation available under its name (one of job.config.EVALUATIONS)."""
    assert cls.name in EVALUATIONS, cls.name
    REGISTRY[cls.name] = cls
    return cls


@dataclass(frozen=True)
class RunSpec:
    """One downstream training (job.downstream.train_downstream's arguments, the mode resolved)."""

    init: str
    fraction: float
    seed: int
    mode: str

    @property
    def kind(self) -> str:
        """pretrained, scratch or s4l: the downstream time's split in metrics.json."""
        return S4L if self.mode == S4L else self.init


class Inputs:
    """What the evaluations share: the split, both backbones and their transfer features, the downstream runs.

    Built in the same order as before the evaluations were plug-ins: the random backbone right after
    seeding Keras with runtime.seed, so that it is the same network whatever runs.
    """

    def __init__(self, ctx: Context):
        self.ctx, self.config = ctx, ctx.config
        self.split = downstream_split(ctx)
        self.backbone = pretrained_backbone(ctx)
        keras.utils.set_random_seed(ctx.config.runtime.seed)
        self.random_backbone = build_configured_backbone(ctx, weights="none")
        self.layers = transfer_layers(ctx)
        self.seeds = finetune_seeds(ctx.config)
        self.fractions = sorted(set(ctx.config.evaluate.label_fractions))
        self.probe = probe_settings(ctx)
        self.runs: dict[RunSpec, dict] = {}

    def spec(self, init: str, fraction: float, seed: int, mode: str | None = None) -> RunSpec:
        return RunSpec(init, fraction, seed, mode or self.config.finetune.mode)

    def fraction_seeds(self, fraction: float) -> list[int]:
        """The seeds of label fraction `fraction` (one of `fractions`): evaluate.label_fraction_seeds."""
        return fraction_seeds(self.config)[fraction]

    def specs(self, init: str, mode: str | None = None) -> list[RunSpec]:
        """The downstream runs of `init` (and `mode`) at every label fraction, each with its seeds."""
        return [self.spec(init, f, s, mode) for f in self.fractions for s in self.fraction_seeds(f)]

    def accuracies(self, init: str, fraction: float, mode: str | None = None) -> list[float]:
        """Val accuracy of each seed's downstream run (trained by the protocol before `run`)."""
        return [self.runs[self.spec(init, fraction, s, mode)]["val_accuracy"] for s in self.fraction_seeds(fraction)]

    @cached_property
    def networks(self) -> dict[str, keras.Model]:
        return {"pretrained": self.backbone, "random": self.random_backbone}

    @cached_property
    def features(self) -> dict[str, keras.Model]:
        """The frozen features the downstream head sees (finetune.transfer_layers), pretrained and random."""
        return {name: transfer_features(net, self.layers) for name, net in self.networks.items()}

    @cached_property
    def downstream_features(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Train and val downstream images through `features`, for each backbone."""
        return {name: (predict(model, self.split.train_images), predict(model, self.split.val_images))
                for name, model in self.features.items()}

    def probe_accuracy(self, name: str) -> float:
        """Val accuracy of the fish/duck linear probe on backbone `name`'s transfer features."""
        train, val = self.downstream_features[name]
        return linear_probe(train, self.split.train_labels, val, self.split.val_labels, 2,
                            seed=self.config.runtime.seed, **self.probe)

    @cached_property
    def folds(self) -> np.ndarray:
        """Each downstream train image's fold for the probes cross-validated on the train labels: the folds the
        "auto" transfer cut is chosen on (job.downstream.select_transfer_layers)."""
        return fold_ids(len(self.split.train_labels), CV_FOLDS, self.config.runtime.seed)

    def cross_validated(self, train_features: np.ndarray) -> float:
        """The fish/duck linear probe on downstream train features, cross-validated on their labels (no val)."""
        return cross_validated_accuracy(train_features, self.split.train_labels, 2, self.folds,
                                        seed=self.config.runtime.seed, **self.probe)


class Evaluation(ABC):
    """One evaluation: built from the config, it runs on the shared `Inputs` and returns its results."""

    name: ClassVar[str]  # its name in evaluate.evaluations
    title: ClassVar[str]  # how the log names it
    switch: ClassVar[str | None] = None  # its boolean key in [evaluate], if it has one
    column: ClassVar[str | None] = None  # its column of the label-efficiency rows, if any
    keys: ClassVar[dict[str, str]] = {}  # its metrics.json entries: dotted key → its key in evaluate/done.json

    def __init__(self, config: Config):
        self.config = config

    def runs(self, inputs: Inputs) -> list[RunSpec]:
        """The downstream runs it reads (trained, or reused, by the protocol before `run`)."""
        return []

    @abstractmethod
    def run(self, inputs: Inputs) -> dict[str, Any]:
        """Its results: keys of evaluate/done.json (and BY_FRACTION, its label-efficiency column)."""

    @classmethod
    def metrics(cls, done: dict) -> dict[str, Any]:
        """Its metrics.json entries by dotted key, read from evaluate/done.json (None where it did not run)."""
        return {dotted: done.get(key) for dotted, key in cls.keys.items()}


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    return (float(np.mean(values)), float(np.std(values))) if values else (None, None)


@register
class LinearProbe(Evaluation):
    """Logistic regression on the frozen transfer features, pretrained and from random init."""

    name, title = "linear_probe", "linear probe"
    keys = {"downstream.linear_probe_val_accuracy": "linear_probe_val_accuracy",
            "downstream.random_linear_probe_val_accuracy": "random_linear_probe_val_accuracy",
            "downstream.linear_probe_cv_accuracy": "linear_probe_cv_accuracy",
            "downstream.random_linear_probe_cv_accuracy": "random_linear_probe_cv_accuracy"}

    def run(self, inputs: Inputs) -> dict[str, Any]:
        result = {"linear_probe_val_accuracy": inputs.probe_accuracy("pretrained"),
                  "random_linear_probe_val_accuracy": inputs.probe_accuracy("random"),
                  "linear_probe_cv_accuracy": inputs.cross_validated(inputs.downstream_features["pretrained"][0]),
                  "random_linear_probe_cv_accuracy": inputs.cross_validated(inputs.downstream_features["random"][0])}
        log.info("evaluate: linear probe on %s %.4f (random init %.4f); %d-fold cross-validated on the train labels "
                 "%.4f (random init %.4f)", "+".join(inputs.layers), result["linear_probe_val_accuracy"],
                 result["random_linear_probe_val_accuracy"], CV_FOLDS, result["linear_probe_cv_accuracy"],
                 result["random_linear_probe_cv_accuracy"])
        return result



@register
class Knn(Evaluation):
    """Cosine k-NN on the frozen pretrained transfer features."""

    name, title = "knn", "k-NN"
    keys = {"downstream.knn_val_accuracy": "knn_val_accuracy", "downstream.knn_k": "knn_k",
            "downstream.knn_k_configured": "knn_k_configured"}

    def run(self, inputs: Inputs) -> dict[str, Any]:
        configured, labels = self.config.evaluate.knn_k, inputs.split.train_labels
        k = capped_knn_k(configured, len(labels))
        if k != configured:
            log.info("evaluate: evaluate.knn_k = %d is not below the %d downstream train images: k-NN uses k = %d",
                     configured, len(labels), k)
        train, val = inputs.downstream_features["pretrained"]
        accuracy = knn_accuracy(train, labels, val, inputs.split.val_labels, k)
        log.info("evaluate: k-NN (k = %d) on %s %.4f", k, "+".join(inputs.layers), accuracy)
        return {"knn_val_accuracy": accuracy, "knn_k": k, "knn_k_configured": configured}



@register
class LinearProbeAllClasses(Evaluation):
    """The all-class (200-way) linear probe on Tiny ImageNet val, pretrained and from random init."""

    name, title, switch = "linear_probe_200", "all-class linear probe", "linear_probe_200"
    keys = {"pretext.linear_probe_200_top1": "linear_probe_200_top1",
            "pretext.random_linear_probe_200_top1": "random_linear_probe_200_top1"}

    def run(self, inputs: Inputs) -> dict[str, Any]:
        data, result = inputs.ctx.dataset, {}
        for name, model in inputs.features.items():
            key = "linear_probe_200_top1" if name == "pretrained" else "random_linear_probe_200_top1"
            result[key] = linear_probe(
                predict(model, data.train.images), data.train.labels, predict(model, data.val.images),
                data.val.labels, len(data.wnids), seed=self.config.runtime.seed, **inputs.probe,
            )
        log.info("evaluate: %d-way linear probe top-1 %.4f (random init %.4f)", len(data.wnids),
                 result["linear_probe_200_top1"], result["random_linear_probe_200_top1"])
        return result



def _probe_by_depth(inputs: Inputs, layers: list[str], train: tuple[np.ndarray, np.ndarray],
                    val: tuple[np.ndarray, np.ndarray], classes: int,
                    cross_validate: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """A linear probe on features pooled at each of `layers`, of the pretrained and the random backbone, trained
    on `train` (images, labels) and scored on `val`: rows {layer, pretrained, random}; with `cross_validate`
    (the fish/duck split only), also the same rows of the probe cross-validated on the train labels (else None)."""
    scores: dict[str, list[float]] = {}
    cross_validated: dict[str, list[float]] = {}
    for name, net in inputs.networks.items():
        model = pooled_block_features(net, layers)
        train_features, val_features = predict(model, train[0]), predict(model, val[0])
        scores[name] = [
            linear_probe(t, train[1], v, val[1], classes, seed=inputs.config.runtime.seed, **inputs.probe)
            for t, v in zip(train_features, val_features, strict=True)
        ]
        if cross_validate:
            cross_validated[name] = [inputs.cross_validated(t) for t in train_features]

    def rows(by_name: dict[str, list[float]]) -> list[dict[str, Any]]:
        return [{"layer": layer, **{name: by_name[name][i] for name in FROZEN}} for i, layer in enumerate(layers)]

    return rows(scores), rows(cross_validated) if cross_validate else None


def _log_depth_rows(what: str, rows: list[dict[str, Any]]) -> None:
    log.info("evaluate: %s by depth (pretrained / random init): %s", what,
             ", ".join(f"{r['layer']} {r['pretrained']:.3f}/{r['random']:.3f}" for r in rows))


@register
class DepthProbe(Evaluation):
    """The fish/duck linear probe on features pooled at each of evaluate.depth_probe_layers, pretrained vs
    random init: where the transferable information sits."""

    name, title, switch = "depth_probe", "linear probe by depth", "depth_probe"
    keys = {"downstream.depth_probe": "depth_probe", "downstream.depth_probe_cv": "depth_probe_cv"}

    def run(self, inputs: Inputs) -> dict[str, Any]:
        split = inputs.split
        rows, cross_validated = _probe_by_depth(inputs, self.config.evaluate.depth_probe_layers,
                                                (split.train_images, split.train_labels),
                                                (split.val_images, split.val_labels), 2, cross_validate=True)
        _log_depth_rows("probe", rows)
        _log_depth_rows(f"probe {CV_FOLDS}-fold cross-validated on the train labels", cross_validated)
        return {"depth_probe": rows, "depth_probe_cv": cross_validated}


@register
class DepthProbeAllClasses(Evaluation):
    """The all-class (200-way) linear probe at each of evaluate.depth_probe_layers, pretrained vs random init:
    the depth probe's question asked of every class, on every val image (2,080 on the mini set, against the
    fish/duck probe's 100)."""

    name, title, switch = "depth_probe_200", "all-class linear probe by depth", "depth_probe_200"
    keys = {"pretext.linear_probe_200_by_depth": "linear_probe_200_by_depth"}

    def run(self, inputs: Inputs) -> dict[str, Any]:
        data = inputs.ctx.dataset
        rows, _ = _probe_by_depth(inputs, self.config.evaluate.depth_probe_layers,
                                  (data.train.images, data.train.labels), (data.val.images, data.val.labels),
                                  len(data.wnids))
        _log_depth_rows(f"{len(data.wnids)}-way probe", rows)
        return {"linear_probe_200_by_depth": rows}


@register
class ColourBaseline(Evaluation):
    """Logistic regression on RGB colour histograms (no network), on each downstream run's labelled subset."""

    name, title, switch, column = "colour_baseline", "colour-histogram baseline", "colour_baseline", "colour_histogram"

    def run(self, inputs: Inputs) -> dict[str, Any]:
        e, split, base = self.config.evaluate, inputs.split, self.config.finetune.label_fraction
        log.info("evaluate: colour-histogram baseline (%d³ bins, no network)...", e.colour_bins)
        train, val = colour_histograms(split.train_images, e.colour_bins), colour_histograms(split.val_images,
                                                                                                e.colour_bins)
        scored: dict[tuple[float, int], float] = {}

        def scores(fraction: float, seeds: list[int]) -> list[float]:
            for seed in seeds:
                if (fraction, seed) not in scored:
                    subset = stratified_subset(split.train_labels, fraction, seed)
                    scored[fraction, seed] = linear_probe(train[subset], split.train_labels[subset], val,
                                                          split.val_labels, 2, seed=seed, **inputs.probe)
            return [scored[fraction, seed] for seed in seeds]

        by_fraction = {f: scores(f, inputs.fraction_seeds(f)) for f in inputs.fractions}
        log.info("evaluate: colour-histogram baseline %s",
                 ", ".join(f"{console.share(f)} of the labels {np.mean(v):.3f}" for f, v in by_fraction.items()))
        return {"colour_histogram": scores(base, inputs.seeds), BY_FRACTION: by_fraction}

    @classmethod
    def metrics(cls, done: dict) -> dict[str, Any]:
        mean, std = _mean_std(done.get("colour_histogram", []))
        return {"baseline.colour_histogram_val_accuracy": mean, "baseline.colour_histogram_val_accuracy_std": std}


@register
class ScratchBaseline(Evaluation):
    """The downstream recipe from random init, at finetune.label_fraction and at each label fraction."""

    name, title, switch, column = "scratch_baseline", "scratch baseline", "scratch_baseline", "scratch"

    def runs(self, inputs: Inputs) -> list[RunSpec]:
        base = self.config.finetune.label_fraction
        return [inputs.spec(SCRATCH, base, s) for s in inputs.seeds] + inputs.specs(SCRATCH)

    def run(self, inputs: Inputs) -> dict[str, Any]:
        base = self.config.finetune.label_fraction
        return {"scratch": [inputs.runs[inputs.spec(SCRATCH, base, s)] for s in inputs.seeds],
                BY_FRACTION: {f: inputs.accuracies(SCRATCH, f) for f in inputs.fractions}}

    @classmethod
    def metrics(cls, done: dict) -> dict[str, Any]:
        mean, std = _mean_std([r["val_accuracy"] for r in done.get("scratch", [])])
        return {"baseline.scratch_val_accuracy": mean, "baseline.scratch_val_accuracy_std": std}


@register
class LabelEfficiency(Evaluation):
    """The pretrained downstream recipe at each of evaluate.label_fractions (the table's first column)."""

    name, title, column = "label_efficiency", "label efficiency", "pretrained"

    def runs(self, inputs: Inputs) -> list[RunSpec]:
        return inputs.specs(PRETRAINED)

    def run(self, inputs: Inputs) -> dict[str, Any]:
        return {BY_FRACTION: {f: inputs.accuracies(PRETRAINED, f) for f in inputs.fractions}}


@register
class S4LRows(Evaluation):
    """S4L (finetune.mode = "s4l") from the pretrained backbone at each label fraction, a row of its own
    (none when finetune.mode is "s4l" already: the pretrained rows are S4L)."""

    name, title, switch, column = "s4l", "S4L rows", "s4l", "s4l"

    def runs(self, inputs: Inputs) -> list[RunSpec]:
        if self.config.finetune.mode == S4L:
            return []
        return inputs.specs(PRETRAINED, S4L)

    def run(self, inputs: Inputs) -> dict[str, Any]:
        if self.config.finetune.mode == S4L:
            return {}
        return {BY_FRACTION: {f: inputs.accuracies(PRETRAINED, f, S4L) for f in inputs.fractions}}


def enabled(config: Config) -> list[Evaluation]:
    """The evaluations this config runs: listed in evaluate.evaluations and not switched off."""
    e = config.evaluate
    return [REGISTRY[name](config) for name in e.evaluations
            if REGISTRY[name].switch is None or getattr(e, REGISTRY[name].switch)]


def log_switched_off(config: Config) -> None:
    """Say which evaluations the config leaves out, and by which key."""
    e, skipped = config.evaluate, []
    for name, cls in REGISTRY.items():
        if name not in e.evaluations:
            skipped.append(f"{cls.title} (not in evaluate.evaluations)")
        elif cls.switch is not None and not getattr(e, cls.switch):
            skipped.append(f"{cls.title} (evaluate.{cls.switch} = false)")
    if skipped:
        log.info("evaluate: skipping %s", ", ".join(skipped))


def training_order(specs: list[RunSpec], config: Config) -> list[RunSpec]:
    """The downstream runs, each once, in the protocol's one order: the finetune stage's (pretrained at
    finetune.label_fraction), the scratch baseline's there, then per label fraction pretrained, scratch, S4L."""
    base, mode = config.finetune.label_fraction, config.finetune.mode
    kinds = {PRETRAINED: 0, SCRATCH: 1, S4L: 2}

    def key(spec: RunSpec) -> tuple:
        if spec.fraction == base and spec.mode == mode and spec.init in (PRETRAINED, SCRATCH):
            return 0, kinds[spec.init], 0.0, spec.seed
        return 1, spec.fraction, kinds[spec.kind], spec.seed

    return sorted(set(specs), key=key)


def _timed(timing: dict[str, float], name: str, work: Callable[[], Any]) -> Any:
    clock = time.perf_counter()
    try:
        return work()
    finally:
        timing[name] = time.perf_counter() - clock


def run_protocol(ctx: Context) -> dict:
    """Every enabled evaluation and the downstream runs they read; returns evaluate/done.json's results."""
    config = ctx.config
    log_switched_off(config)
    timing: dict[str, float] = {}
    inputs = _timed(timing, "setup", lambda: Inputs(ctx))
    evaluations = enabled(config)
    finetune = [inputs.spec(PRETRAINED, config.finetune.label_fraction, s) for s in inputs.seeds]
    wanted = finetune + [spec for evaluation in evaluations for spec in evaluation.runs(inputs)]
    results: dict[str, Any] = {"transfer_layers": list(inputs.layers), "transfer_selection": transfer_selection(ctx)}
    columns: dict[str, dict[float, list[float]]] = {}

    def run(evaluation: Evaluation) -> None:
        result = _timed(timing, evaluation.name, lambda: evaluation.run(inputs))
        if BY_FRACTION in result:
            columns[evaluation.column] = result.pop(BY_FRACTION)
        results.update(result)

    for evaluation in evaluations:  # those of frozen features first, as the protocol always did
        if not evaluation.runs(inputs):
            run(evaluation)
    downstream = dict.fromkeys(DOWNSTREAM_KINDS, 0.0)
    for spec in training_order(wanted, config):
        inputs.runs[spec] = run_result = train_downstream(ctx, spec.init, spec.fraction, spec.seed, mode=spec.mode)
        # Runs completed before this invocation keep their own wall time (train time when they predate it).
        downstream[spec.kind] += run_result.get("wall_seconds", run_result.get("train_seconds", 0.0))
    results["finetune"] = [inputs.runs[spec] for spec in finetune]
    for evaluation in evaluations:
        if evaluation.runs(inputs):
            run(evaluation)
    results["label_efficiency"] = [
        {"fraction": f, **{c: [] for c in ROW_COLUMNS}, **{c: values[f] for c, values in columns.items()}}
        for f in inputs.fractions
    ]
    setup = timing.pop("setup")
    frozen = ("linear_probe", "knn", "linear_probe_200", "depth_probe", "depth_probe_200")
    results["timing"] = {
        "evaluate_setup_s": setup,
        "frozen_probes_s": setup + sum(timing.get(name, 0.0) for name in frozen),
        "colour_baseline_s": timing.get("colour_baseline", 0.0),
        "downstream_s": sum(downstream.values()),
        **{f"downstream_{kind}_s": seconds for kind, seconds in downstream.items()},
        "evaluations": timing,
    }
    return results


def metrics(done: dict) -> dict[str, Any]:
    """Every registered evaluation's metrics.json entries, by dotted key (null for those that did not run)."""
    return {key: value for cls in REGISTRY.values() for key, value in cls.metrics(done).items()}
