"""The job's stages, each inputs → outputs in the run directory, skipped when already complete.

pretrain:  train images (labels unused) → rotation-pretrained backbone (model/backbone.keras)   [job/pretext.py]
finetune:  backbone + fish/duck labels → classifier (model/classifier.keras), one run per seed  [job/downstream.py]
evaluate:  backbone → linear probe, k-NN, scratch baseline, label efficiency → report/
"""

from __future__ import annotations

import logging
import time

import keras
import numpy as np

from job import console, report, summaries
from job.context import Context, build_configured_backbone, pretrained_backbone, probe_settings, read_done
from job.downstream import (
    PRETRAINED,
    S4L,
    SCRATCH,
    check_inputs,
    downstream_split,
    train_downstream,
    transfer_layers,
    transfer_selection,
)
from job.errors import JobError
from job.evaluate import capped_knn_k, colour_histograms, knn_accuracy, linear_probe, predict
from job.pipelines import rotate_four, stratified_subset
from job.pretext import pretrain
from models.backbone import pooled_block_features, transfer_features

log = logging.getLogger(__name__)

__all__ = ["Context", "check_inputs", "evaluate", "finetune", "pretrain"]


def _seeds(ctx: Context) -> list[int]:
    return [ctx.config.runtime.seed + i for i in range(ctx.config.finetune.seeds)]


def finetune(ctx: Context) -> list[dict]:
    """The downstream task from the pretrained backbone, once per seed."""
    if not ctx.layout.backbone.is_file():
        raise JobError(f"{ctx.layout.backbone} is missing: run `python -m job pretrain` with this --output first.")
    return [train_downstream(ctx, PRETRAINED, ctx.config.finetune.label_fraction, s) for s in _seeds(ctx)]


# -- evaluate --------------------------------------------------------------------------------------
def evaluate(ctx: Context) -> dict:
    """Frozen-feature probes, scratch baseline and label efficiency; then metrics.json and report.md."""
    layout = ctx.layout
    pretext = read_done(layout.pretext)
    if pretext is None or not layout.backbone.is_file():
        raise JobError(f"{layout.backbone} is missing: run `python -m job pretrain` with this --output first.")
    done = ctx.completed(layout.evaluate)
    fresh = done is None or not layout.metrics.is_file()
    if fresh:
        done = _evaluations(ctx)
    else:
        log.info("evaluate: complete in %s, skipping its evaluations (use --force to redo); writing the report "
                 "from them", layout.evaluate)
    metrics = report.build_metrics(pretext, done, ctx.dataset_summary())
    if ctx.cluster.is_chief:
        log.info("evaluate: writing the report (figures, metrics.json, report.md)...")
        report.write_report(layout.report, metrics, _examples(ctx, done))
        if fresh or not any(layout.summary_logs.glob(summaries.EVENTS_GLOB)):  # once per evaluation
            summaries.write_run_summary(layout.summary_logs, ctx.config, ctx.data_identity, ctx.dataset_summary(),
                                        metrics, report.verdict_markdown(metrics))
    if fresh:  # after the report: whoever sees done.json finds this report, not an older one
        ctx.finish(layout.evaluate, done)
    return metrics


def _evaluations(ctx: Context) -> dict:
    cfg, e = ctx.config, ctx.config.evaluate
    clock = time.perf_counter()
    _log_switched_off(ctx)
    split = downstream_split(ctx)
    backbone = pretrained_backbone(ctx)
    keras.utils.set_random_seed(cfg.runtime.seed)
    random_backbone = build_configured_backbone(ctx, weights="none")
    layers = transfer_layers(ctx)
    knn_k = capped_knn_k(e.knn_k, len(split.train_labels))
    if knn_k != e.knn_k:
        log.info("evaluate: evaluate.knn_k = %d is not below the %d downstream train images: k-NN uses k = %d",
                 e.knn_k, len(split.train_labels), knn_k)
    log.info("evaluate: frozen-feature probes (linear, k-NN) on %s, pretrained and random init...", "+".join(layers))
    # The frozen features the downstream head sees (finetune.transfer_layers), pretrained and from random init.
    features = {"pretrained": transfer_features(backbone, layers), "random": transfer_features(random_backbone, layers)}
    train_features, val_features = predict(features["pretrained"], split.train_images), predict(
        features["pretrained"], split.val_images)
    probe = probe_settings(ctx)
    result: dict = {
        "transfer_layers": list(layers),
        "transfer_selection": transfer_selection(ctx),
        "linear_probe_val_accuracy": linear_probe(
            train_features, split.train_labels, val_features, split.val_labels, 2, seed=cfg.runtime.seed, **probe
        ),
        "random_linear_probe_val_accuracy": linear_probe(
            predict(features["random"], split.train_images), split.train_labels,
            predict(features["random"], split.val_images), split.val_labels, 2, seed=cfg.runtime.seed, **probe,
        ),
        "knn_val_accuracy": knn_accuracy(train_features, split.train_labels, val_features, split.val_labels, knn_k),
        "knn_k": knn_k,
        "knn_k_configured": e.knn_k,
        "linear_probe_200_top1": None,
        "random_linear_probe_200_top1": None,
    }
    log.info("evaluate: linear probe on %s %.4f (random init %.4f), k-NN %.4f", "+".join(layers),
             result["linear_probe_val_accuracy"], result["random_linear_probe_val_accuracy"],
             result["knn_val_accuracy"])
    if e.linear_probe_200:
        data = ctx.dataset
        for name, model in features.items():
            key = "linear_probe_200_top1" if name == "pretrained" else "random_linear_probe_200_top1"
            result[key] = linear_probe(
                predict(model, data.train.images), data.train.labels, predict(model, data.val.images),
                data.val.labels, len(data.wnids), seed=cfg.runtime.seed, **probe,
            )
        log.info("evaluate: %d-way linear probe top-1 %.4f (random init %.4f)", len(data.wnids),
                 result["linear_probe_200_top1"], result["random_linear_probe_200_top1"])
    result["depth_probe"] = _depth_probe(ctx, backbone, random_backbone, split) if e.depth_probe else None
    timing = {"frozen_probes_s": time.perf_counter() - clock}
    clock = time.perf_counter()
    result["finetune"] = finetune(ctx)
    fractions = sorted(set(e.label_fractions))
    result["scratch"] = (
        [train_downstream(ctx, SCRATCH, cfg.finetune.label_fraction, s) for s in _seeds(ctx)]
        if e.scratch_baseline else []
    )
    colour_fractions = sorted({*fractions, cfg.finetune.label_fraction})
    colour_clock = time.perf_counter()
    colour = _colour_baseline(ctx, split, colour_fractions) if e.colour_baseline else {}
    timing["colour_baseline_s"] = time.perf_counter() - colour_clock
    result["colour_histogram"] = colour.get(cfg.finetune.label_fraction, [])
    s4l = e.s4l and cfg.finetune.mode != S4L  # else the pretrained rows are S4L already
    result["label_efficiency"] = [
        {
            "fraction": fraction,
            "pretrained": [train_downstream(ctx, PRETRAINED, fraction, s)["val_accuracy"] for s in _seeds(ctx)],
            "scratch": ([train_downstream(ctx, SCRATCH, fraction, s)["val_accuracy"] for s in _seeds(ctx)]
                        if e.scratch_baseline else []),
            "colour_histogram": colour.get(fraction, []),
            **({S4L: [train_downstream(ctx, PRETRAINED, fraction, s, mode=S4L)["val_accuracy"] for s in _seeds(ctx)]}
               if s4l else {}),
        }
        for fraction in fractions
    ]
    # Downstream trainings of this invocation (runs completed earlier count as done, at no cost).
    timing["downstream_s"] = time.perf_counter() - clock - timing["colour_baseline_s"]
    result["timing"] = timing
    return result


def _log_switched_off(ctx: Context) -> None:
    """Say which of the evaluate stage's optional parts the config switches off, and by which key."""
    e = ctx.config.evaluate
    off = {"scratch baseline": ("evaluate.scratch_baseline", e.scratch_baseline),
           "colour-histogram baseline": ("evaluate.colour_baseline", e.colour_baseline),
           "S4L rows": ("evaluate.s4l", e.s4l),
           "linear probe by depth": ("evaluate.depth_probe", e.depth_probe),
           "all-class linear probe": ("evaluate.linear_probe_200", e.linear_probe_200)}
    skipped = [f"{name} ({key} = false)" for name, (key, on) in off.items() if not on]
    if skipped:
        log.info("evaluate: skipping %s", ", ".join(skipped))


def _colour_baseline(ctx: Context, split, fractions: list[float]) -> dict[float, list[float]]:
    """Val accuracy per seed of logistic regression on RGB colour histograms, on the downstream runs' subsets."""
    e = ctx.config.evaluate
    log.info("evaluate: colour-histogram baseline (%d³ bins, no network)...", e.colour_bins)
    train = colour_histograms(split.train_images, e.colour_bins)
    val = colour_histograms(split.val_images, e.colour_bins)
    probe = probe_settings(ctx)
    scores = {}
    for fraction in fractions:
        scores[fraction] = []
        for seed in _seeds(ctx):
            subset = stratified_subset(split.train_labels, fraction, seed)
            scores[fraction].append(
                linear_probe(train[subset], split.train_labels[subset], val, split.val_labels, 2, seed=seed, **probe)
            )
    log.info("evaluate: colour-histogram baseline %s",
             ", ".join(f"{console.share(f)} of the labels {np.mean(v):.3f}" for f, v in scores.items()))
    return scores


def _depth_probe(ctx: Context, backbone: keras.Model, random_backbone: keras.Model, split) -> list[dict]:
    """Downstream linear probe on features pooled at each configured depth, pretrained vs random init."""
    cfg, e = ctx.config, ctx.config.evaluate
    networks = {"pretrained": backbone, "random": random_backbone}
    by_depth = {name: pooled_block_features(net, e.depth_probe_layers) for name, net in networks.items()}
    probe = probe_settings(ctx)
    scores = {}
    for name, model in by_depth.items():
        train, val = predict(model, split.train_images), predict(model, split.val_images)
        scores[name] = [
            linear_probe(t, split.train_labels, v, split.val_labels, 2, seed=cfg.runtime.seed, **probe)
            for t, v in zip(train, val, strict=True)
        ]
    rows = [
        {"layer": layer, "pretrained": scores["pretrained"][i], "random": scores["random"][i]}
        for i, layer in enumerate(e.depth_probe_layers)
    ]
    log.info("evaluate: probe by depth (pretrained / random init): %s",
             ", ".join(f"{r['layer']} {r['pretrained']:.3f}/{r['random']:.3f}" for r in rows))
    return rows


def _examples(ctx: Context, evaluations: dict) -> report.Examples:
    """Images and predictions for the report's figures."""
    split, count = downstream_split(ctx), ctx.config.evaluate.report_examples
    rotation_model = keras.models.load_model(ctx.layout.rotation_model, compile=False)
    upright = np.asarray(ctx.dataset.val.images[: max(1, count // 4)])
    rotation_logits, angles = predict(rotation_model, upright, rotations=True)
    rotated, _ = rotate_four(upright)
    first = evaluations["finetune"][0]
    return report.Examples(
        rotated_images=rotated,
        rotation_true=angles * 90,
        rotation_predicted=np.argmax(rotation_logits, -1) * 90,
        val_images=split.val_images,
        val_true=split.val_labels,
        val_predicted=np.asarray(first["val_predictions"]),
        class_names=list(ctx.config.data.downstream_names),
        count=count,
    )

