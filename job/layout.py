"""The run directory layout, defined once and used by every stage, the syncer and the report.

    <output>/
      config.json                          the resolved configuration of the last invocation
      run.json                             the data it read (--data as given and its version)
      force.json                           the job whose --force cleared which stages (a restart resumes them)
      checkpoints/pretext/                 ckpt/ (CheckpointManager), history.json, best.weights.h5, done.json
      checkpoints/pretext/ckpt/            per kept checkpoint ckpt-N.index, .data-*, and its companions
                                           ckpt-N.history.json, ckpt-N.best.weights.h5 (job/units.py)
      checkpoints/downstream/<run>/        one per downstream training (init, mode, labels, seed): same files
      checkpoints/evaluate/done.json       probe, k-NN and baseline results
      model/backbone.keras                 the pretrained backbone (pixels in [0, 255] → pooled features); the
                                           layers past pretext.head_layer keep their initial weights
      model/rotation_model.keras           backbone up to pretext.head_layer + rotation head
      model/rotation_savedmodel/           the same as a servable SavedModel (encoded images → probabilities, angle)
      model/classifier.keras               fish-vs-duck classifier (seed 0 of the finetune stage)
      model/classifier_savedmodel/         the same as a servable SavedModel (encoded images → probabilities,
                                           class_name; job/serving.py)
      logs/pretext, logs/finetune/<run>    TensorBoard event files of each training (one step axis: the global step)
      logs/summary                         the run's HParams session, final metrics, config, data and verdict (text)
      report/metrics.json, report/report.md, report/*.png

The names `model/`, `checkpoints/` and `logs/` are Vertex AI's: with `--output` set to a custom job's
base output directory they are exactly AIP_MODEL_DIR, AIP_CHECKPOINT_DIR and AIP_TENSORBOARD_LOG_DIR.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DONE = "done.json"
SUMMARY_LOGS = "summary"  # logs/summary


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def run_record(self) -> Path:
        return self.root / "run.json"

    @property
    def force_marker(self) -> Path:
        return self.root / "force.json"

    @property
    def pretext(self) -> Path:
        return self.checkpoints / "pretext"

    def downstream(self, init: str, mode: str, fraction: float, seed: int) -> Path:
        return self.checkpoints / "downstream" / f"{init}-{mode}-labels{fraction:g}-seed{seed}"

    @property
    def evaluate(self) -> Path:
        return self.checkpoints / "evaluate"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def export(self) -> Path:
        return self.root / "model"

    @property
    def backbone(self) -> Path:
        return self.export / "backbone.keras"

    @property
    def rotation_model(self) -> Path:
        return self.export / "rotation_model.keras"

    @property
    def rotation_savedmodel(self) -> Path:
        return self.export / "rotation_savedmodel"

    @property
    def classifier(self) -> Path:
        return self.export / "classifier.keras"

    @property
    def classifier_savedmodel(self) -> Path:
        return self.export / "classifier_savedmodel"

    def tensorboard(self, stage: str) -> Path:
        return self.root / "logs" / stage

    @property
    def summary_logs(self) -> Path:
        """The run's HParams session and text summaries (written with the report, job/summaries.py)."""
        return self.tensorboard(SUMMARY_LOGS)

    def logs_of(self, stage_dir: Path) -> Path:
        """The TensorBoard directory of a stage directory: logs/pretext, logs/finetune/<run> or logs/summary."""
        if stage_dir == self.pretext:
            return self.tensorboard("pretext")
        if stage_dir == self.evaluate:
            return self.summary_logs
        return self.tensorboard("finetune") / stage_dir.name

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def metrics(self) -> Path:
        return self.report / "metrics.json"

    @staticmethod
    def done(stage_dir: Path) -> Path:
        return stage_dir / DONE
