"""The job's stages, each inputs → outputs in the run directory, skipped when already complete.

pretrain:  train images (labels unused) → rotation-pretrained backbone (model/backbone.keras)   [job/pretext.py]
finetune:  backbone + fish/duck labels → classifier (model/classifier.keras), one run per seed  [job/downstream.py]
evaluate:  backbone → the evaluations of job/evaluations.py (probes, baselines, label efficiency) → report/
"""

from __future__ import annotations

import logging
import time

import numpy as np

from job import evaluations, report, summaries
from job.context import Context, read_done
from job.downstream import PRETRAINED, check_inputs, downstream_split, finetune_seeds, train_downstream
from job.errors import JobError
from job.pipelines import rotate_four
from job.pretext import pretrain
from job.probes import predict
from models.backbone import load_model

log = logging.getLogger(__name__)

__all__ = ["Context", "check_inputs", "evaluate", "finetune", "pretrain"]


def finetune(ctx: Context) -> list[dict]:
    """The downstream task from the pretrained backbone, once per seed."""
    if not ctx.layout.backbone.is_file():
        raise JobError(f"{ctx.layout.backbone} is missing: run `python -m job pretrain` with this --output first.")
    fraction = ctx.config.finetune.label_fraction
    return [train_downstream(ctx, PRETRAINED, fraction, s) for s in finetune_seeds(ctx.config)]


# -- evaluate --------------------------------------------------------------------------------------
def evaluate(ctx: Context) -> dict:
    """The evaluations (job/evaluations.py) and the downstream runs they read; then metrics.json and report.md."""
    layout = ctx.layout
    pretext = read_done(layout.pretext)
    if pretext is None or not layout.backbone.is_file():
        raise JobError(f"{layout.backbone} is missing: run `python -m job pretrain` with this --output first.")
    done = ctx.completed(layout.evaluate)
    fresh = done is None or not layout.metrics.is_file()
    if fresh:
        done = evaluations.run_protocol(ctx)
    else:
        log.info("evaluate: complete in %s, skipping its evaluations (use --force to redo); writing the report "
                 "from them", layout.evaluate)
    metrics = report.build_metrics(pretext, done, ctx.dataset_summary(), evaluations.metrics(done))
    if ctx.cluster.is_chief:
        log.info("evaluate: writing the report (figures, metrics.json, report.md)...")
        clock = time.perf_counter() if fresh else None
        report.write_report(layout.report, metrics, _examples(ctx, done), started=clock)
        if fresh:  # kept with the results: a rewritten report (a rerun) writes the same metrics.json
            done = {**done, "timing": {**done.get("timing", {}), "report_s": metrics["timing"].get("report_s")}}
        if fresh or not any(layout.summary_logs.glob(summaries.EVENTS_GLOB)):  # once per evaluation
            summaries.write_run_summary(layout.summary_logs, ctx.config, ctx.data_identity, ctx.dataset_summary(),
                                        metrics, report.verdict_markdown(metrics))
    if fresh:  # after the report: whoever sees done.json finds this report, not an older one
        ctx.finish(layout.evaluate, done)
    return metrics


def _examples(ctx: Context, done: dict) -> report.Examples:
    """Images and predictions for the report's figures."""
    split, count = downstream_split(ctx), ctx.config.evaluate.report_examples
    rotation_model = load_model(ctx.layout.rotation_model)
    upright = np.asarray(ctx.dataset.val.images[: max(1, count // 4)])
    rotation_logits, angles = predict(rotation_model, upright, rotations=True)
    rotated, _ = rotate_four(upright)
    first = done["finetune"][0]
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

