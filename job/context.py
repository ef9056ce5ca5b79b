"""The stage-level object: the config, the run layout, the data and the cluster, and what a job builds once."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import keras

from job.config import Config, EvaluateConfig
from job.data import Dataset, load_dataset
from job.distribute import Cluster
from job.files import read_json, write_json
from job.layout import RunLayout
from job.rundir import FINGERPRINT_KEY, REDO_FIX, ForceRecord, discard, fingerprint, kind_of
from job.task import NO_WEIGHTS, configured_backbone
from models.backbone import load_backbone_weights

log = logging.getLogger(__name__)

LISTED_SKIPPED = 20  # unreadable files named in metrics.json and the report


@dataclass
class Context:
    """What every stage needs: the config, where to write, where the data is, and the cluster."""

    config: Config
    layout: RunLayout
    data_path: Path
    cluster: Cluster
    force: bool = False
    data_identity: dict | None = None  # --data and its version, recorded in each done.json (job/rundir.py)
    force_record: ForceRecord | None = None  # stages this job's --force already cleared before a restart
    clear_remote: Callable[[Path], object] | None = None  # clears a stage directory in a gs:// output too
    _forced: set[Path] = field(default_factory=set)
    # Results this (non-chief) worker finished itself: the chief's done.json may reach it only at the next
    # stage boundary (a gs:// output pulled into its own mirror), and a stage may reuse a run it just finished.
    _finished: dict[Path, dict] = field(default_factory=dict)
    # Objects built once per job and shared by the runs of a stage (the downstream split, traced models).
    built: dict = field(default_factory=dict)

    @cached_property
    def dataset(self) -> Dataset:
        cfg = self.config.data
        return load_dataset(self.data_path, cfg.image_size, Path(cfg.cache_dir).expanduser(), cfg.decode_threads,
                            required_wnids=cfg.downstream_wnids)

    def dataset_summary(self) -> dict:
        d = self.dataset
        return {
            "train_images": len(d.train),
            "val_images": len(d.val),
            "skipped_images": len(d.skipped),
            "skipped_files": d.skipped[: LISTED_SKIPPED],
            "classes": len(d.wnids),
            "decode_images_per_sec": (len(d.train) + len(d.val)) / d.decode_seconds if d.decode_seconds else None,
            "decode_seconds": d.decode_seconds or None,
        }

    def completed(self, stage_dir: Path) -> dict | None:
        """The stage's done.json, or None when it must (re)run; `--force` clears each stage once per job
        (not again when the scheduler restarts the job: see job/rundir.py)."""
        if stage_dir in self._finished:
            return self._finished[stage_dir]
        if self.force and stage_dir not in self._forced:
            self._forced.add(stage_dir)
            record = self.force_record
            if record is not None and record.already_cleared(stage_dir):
                log.info("--force: ignored for %s, which job %s cleared before this restart: resuming it",
                         stage_dir, record.job)
                return read_done(stage_dir)
            if self.cluster.is_chief:
                if stage_dir.exists() or self.layout.logs_of(stage_dir).exists():
                    log.info("--force: discarding %s and its TensorBoard logs", stage_dir)
                self.discard(stage_dir)
                if record is not None:
                    record.record(stage_dir)
            return None
        return read_done(stage_dir)

    def discard(self, stage_dir: Path) -> None:
        """Delete a stage's results and TensorBoard logs, here and in the bucket (else an interrupted redo would
        pull the old done.json and event files back)."""
        discard(self.layout, stage_dir)
        if self.clear_remote is not None:
            for path in (stage_dir, self.layout.logs_of(stage_dir)):
                self.clear_remote(path)

    def finish(self, stage_dir: Path, result: dict) -> dict:
        """Write the stage's done.json with the fingerprint of what it depends on; return its results."""
        if self.cluster.is_chief:
            stamp = {}
            if self.data_identity is not None:
                kind = kind_of(self.layout, stage_dir)
                stamp = {FINGERPRINT_KEY: fingerprint(self.config, kind, self.data_identity)}
            # Durable: the bucket and every later run trust it; a power loss must not leave it empty.
            write_json(RunLayout.done(stage_dir), {**result, **stamp}, durable=True)
        else:
            self._finished[stage_dir] = result
        return result


def read_done(stage_dir: Path) -> dict | None:
    """A stage's results (its done.json without the fingerprint), or None when it has not completed."""
    done = RunLayout.done(stage_dir)
    if not done.is_file():
        return None
    result = read_json(done, REDO_FIX)
    result.pop(FINGERPRINT_KEY, None)
    return result


def build_configured_backbone(ctx: Context, weights: str | None = None) -> keras.Model:
    """The configured backbone (model, data.image_size) with `weights` (default model.weights)."""
    return configured_backbone(ctx.config.model, ctx.config.data.image_size, weights)


def check_model(ctx: Context) -> None:
    """Build the configured backbone once when it loads weights (download, file, shapes): a bad model.weights
    fails here, before anything in the output is touched."""
    if ctx.config.model.weights != NO_WEIGHTS:
        build_configured_backbone(ctx)


def pretrained_backbone(ctx: Context) -> keras.Model:
    """The configured backbone with the pretrain stage's exported weights (model/backbone.keras), read once per
    job (the transfer-layer choice, the probes and every pretrained downstream run share it; read only)."""
    if "pretrained_backbone" not in ctx.built:
        backbone = build_configured_backbone(ctx, weights=NO_WEIGHTS)
        load_backbone_weights(backbone, ctx.layout.backbone)
        ctx.built["pretrained_backbone"] = backbone
    return ctx.built["pretrained_backbone"]


def probe_settings(ctx: Context) -> dict:
    """The logistic-regression probes' settings (evaluate.probe_*), as keywords of job.probes.fit_logistic."""
    return probe_keywords(ctx.config.evaluate)


def probe_keywords(evaluate: EvaluateConfig) -> dict:
    """evaluate.probe_*, as keywords of job.probes.fit_logistic."""
    return {"steps": evaluate.probe_steps, "learning_rate": evaluate.probe_learning_rate,
            "weight_decay": evaluate.probe_weight_decay}
