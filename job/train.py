"""One custom training loop for every stage: distributed steps, checkpoints, resume, TensorBoard, early stop.

Knows nothing of Tiny ImageNet or rotations: a stage hands it a model, an objective (batch → per-example
loss and metric sums), parameter groups with their optimizers, a dataset factory and an evaluator. The traced
step is job/trainstep.py's, the optimizers job/optim.py's, the BatchNorm correction job/batchnorm.py's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import tensorflow as tf

from job import console, units
from job.batchnorm import debias_batchnorm, debiased_batchnorm
from job.distribute import Cluster
from job.files import atomic_path, read_json, write_json
from job.optim import GroupedOptimizer, ParamGroup, WarmupCosine, current_lr, loss_scaled, make_optimizer
from job.summaries import drop_steps_after
from job.trainstep import Batch, Objective, loop_length, make_train_loop

# Callers import these from here too (the trainer's parts live in job/optim.py, job/trainstep.py, job/batchnorm.py).
__all__ = [
    "BEST_WEIGHTS", "HISTORY_FILE", "STOP_REQUESTED", "Batch", "GroupedOptimizer", "LoopConfig", "LoopResult",
    "Objective", "ParamGroup", "Preempted", "Trainer", "WarmupCosine", "debias_batchnorm", "debiased_batchnorm",
    "loop_length", "loss_scaled", "make_optimizer",
]

log = logging.getLogger(__name__)

DatasetFn = Callable[[int, int, tf.distribute.InputContext], tf.data.Dataset]  # (epoch, start_step, ctx)
Evaluator = Callable[[int, tf.summary.SummaryWriter], dict[str, float]]  # (epoch, writer) -> val metrics

HISTORY_FILE = "history.json"
BEST_WEIGHTS = "best.weights.h5"
CHECKPOINT_DIR = "ckpt"
STEP_KEY = "step/.ATTRIBUTES/VARIABLE_VALUE"  # the global step in a checkpoint (tf.train.Checkpoint(step=...))


# Set by a signal handler (SIGTERM, Slurm's warning signal): training saves a checkpoint after the
# current step, on every worker at the same step, and raises Preempted.
STOP_REQUESTED = threading.Event()


class Preempted(Exception):
    """Training stopped on request after saving a checkpoint; rerunning the same command resumes."""

    def __init__(self, step: int):
        super().__init__(f"stopped on request at step {step} after saving a checkpoint")
        self.step = step


@dataclass
class LoopConfig:
    epochs: int
    steps_per_epoch: int
    samples_per_step: int  # global samples per step, for throughput
    checkpoint_every_steps: int
    keep_checkpoints: int
    log_every_steps: int
    steps_per_loop: int = 1  # steps per traced call; the host syncs at most this often (runtime.steps_per_loop)
    patience: int = 0  # epochs without improvement of `monitor` before stopping (0 = never)
    monitor: str = "val_accuracy"
    xla: bool = False
    fresh_batchnorm: bool = True  # BN moving statistics start at Keras' (0, 1): debias them for evaluation


@dataclass
class LoopResult:
    epochs: int
    steps: int
    train_seconds: float
    samples_per_sec: float
    best: float
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """Trains `model` with `objective` under the cluster's strategy, resuming from `directory` if possible."""

    def __init__(
        self,
        cluster: Cluster,
        model: keras.Model,
        objective: Objective,
        groups: list[ParamGroup],
        directory: Path,
        tensorboard_dir: Path,
        config: LoopConfig,
        step_fn: Callable | None = None,
    ):
        """`step_fn`: the traced loop (`make_train_loop`) of an earlier Trainer over the same model, objective
        and groups, reused instead of tracing again (the downstream runs share one model; job/downstream.py)."""
        self.cluster, self.model, self.objective, self.groups = cluster, model, objective, groups
        self.directory, self.config = Path(directory), config
        if len(groups) > 1 and any(isinstance(g.optimizer, keras.optimizers.LossScaleOptimizer) for g in groups):
            raise ValueError("several parameter groups need one loss scale: pass loss_scaled(groups)")
        strategy = cluster.strategy
        with strategy.scope():
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
            self.best = tf.Variable(-math.inf, dtype=tf.float64, trainable=False, name="best_metric")
            self.bad_epochs = tf.Variable(0, dtype=tf.int64, trainable=False, name="bad_epochs")
            for group in groups:
                if not group.optimizer.built:
                    group.optimizer.build(group.variables)
        trackables = {f"optimizer{i}": g.optimizer for i, g in enumerate(groups)}
        self.checkpoint = tf.train.Checkpoint(
            model=model, step=self.step, best=self.best, bad_epochs=self.bad_epochs, **trackables
        )
        self._ckpt_dir = cluster.writable_dir(self.directory / CHECKPOINT_DIR)
        # Non-chief workers keep their best weights beside their private checkpoints: the chief writes the shared
        # file while they would read it (and HDF5 locks it).
        self._best_path = (self.directory if cluster.is_chief else self._ckpt_dir) / BEST_WEIGHTS
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, str(self._ckpt_dir), max_to_keep=config.keep_checkpoints,
            checkpoint_name=units.CHECKPOINT_NAME,
        )
        self._history: list[dict[str, float]] = []  # the completed epochs', saved with each checkpoint
        self._restored: units.Companions | None = None
        if cluster.is_chief:  # the steps after the checkpoint are redone: their old events must not show twice
            drop_steps_after(tensorboard_dir, _checkpointed_step(self.manager))
        self.writer = (
            tf.summary.create_file_writer(str(tensorboard_dir)) if cluster.is_chief else tf.summary.create_noop_writer()
        )
        self.step_fn = step_fn or make_train_loop(
            cluster.strategy, objective, groups, config.xla, looped=config.steps_per_loop > 1
        )
        self._iterator = None
        self.stop_agreed = False

    # -- the steps --------------------------------------------------------------------------------
    def run_steps(self, iterator, steps: int) -> dict[str, tuple[float, float]]:
        """`steps` optimisation steps on batches from a distributed `iterator`, in one traced call: the metrics'
        (sum, count) over them, read on the host once. Sets `stop_agreed` when any worker was asked to stop."""
        if not 1 <= steps <= self.config.steps_per_loop:
            raise ValueError(f"{steps} steps in one call: this trainer runs 1 to {self.config.steps_per_loop}")
        tracing = self.step_fn.experimental_get_tracing_count() == 0
        if tracing:  # the first call traces (and with XLA compiles) the model: tens of seconds on a CPU
            log.info("Compiling the train step (its first call traces the model)...")
            begin = time.perf_counter()
        metrics, stop = self.step_fn(
            iterator, tf.constant(steps, tf.int64), tf.constant(float(STOP_REQUESTED.is_set())), self.step
        )
        if tracing:
            log.info("Train step compiled in %.0f s", time.perf_counter() - begin)
        self.stop_agreed = bool(stop)
        return {name: (float(total), float(count)) for name, (total, count) in metrics.items()}

    # -- the loop ---------------------------------------------------------------------------------
    def restore(self) -> int:
        """Restore the latest checkpoint if there is one; returns the step to continue from."""
        latest = self.manager.latest_checkpoint or tf.train.latest_checkpoint(str(self.directory / CHECKPOINT_DIR))
        if latest:
            self.checkpoint.restore(latest).expect_partial()
            self._adopt(Path(latest))
            log.info("Resumed from %s at step %d", latest, int(self.step.numpy()))
        return int(self.step.numpy())

    def fit(self, dataset_fn: DatasetFn, evaluator: Evaluator) -> LoopResult:
        """Train from the last checkpoint to the end (or early stop); Preempted when asked to stop."""
        try:
            return self._fit(dataset_fn, evaluator)
        except Preempted:
            self.close()
            raise
        finally:
            console.close_progress()  # a bar cut short by an error or a stop leaves the screen to what follows

    def _fit(self, dataset_fn: DatasetFn, evaluator: Evaluator) -> LoopResult:
        cfg, strategy = self.config, self.cluster.strategy
        start = self.restore()
        history = self._history = self._load_history(start // cfg.steps_per_epoch)
        first_epoch = start // cfg.steps_per_epoch
        train_seconds = sum(h.get("epoch_seconds", 0.0) for h in history)
        stopped = cfg.patience > 0 and int(self.bad_epochs.numpy()) >= cfg.patience
        for epoch in range(first_epoch, 0 if stopped else cfg.epochs):
            begin = int(self.step.numpy()) - epoch * cfg.steps_per_epoch
            dataset = strategy.distribute_datasets_from_function(
                lambda ctx, e=epoch, b=begin: dataset_fn(e, b, ctx)
            )
            epoch_start = time.perf_counter()
            train_metrics = self._run_epoch(dataset, epoch)
            epoch_seconds = time.perf_counter() - epoch_start
            train_seconds += epoch_seconds
            with self.evaluation_statistics(), self.writer.as_default(step=int(self.step.numpy())):
                val_metrics = evaluator(epoch, self.writer)  # its summaries at the global step, as the scalars
                stopped = self._early_stopping(self._agreed_metric(val_metrics.get(cfg.monitor)))
            record = {"epoch": epoch + 1, "epoch_seconds": epoch_seconds, **train_metrics, **val_metrics}
            self._write_scalars(val_metrics, "val")
            history.append(record)
            self._save_history(history)
            self._save(int(self.step.numpy()))
            log.info(
                "epoch %d/%d  %s  (%.0f s)",
                epoch + 1, cfg.epochs, "  ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"),
                epoch_seconds,
            )
            if self.stop_agreed:
                self._save_and_stop(int(self.step.numpy()))
            if stopped:
                log.info("Early stopping: %s did not improve for %d epochs", cfg.monitor, cfg.patience)
                break
        self.writer.flush()
        steps = int(self.step.numpy())
        done_samples = steps * cfg.samples_per_step
        return LoopResult(
            epochs=len(history),
            steps=steps,
            train_seconds=train_seconds,
            samples_per_sec=done_samples / train_seconds if train_seconds else 0.0,
            best=float(self.best.numpy()),
            stopped_early=stopped,
            history=history,
        )

    def _run_epoch(self, dataset, epoch: int) -> dict[str, float]:
        cfg = self.config
        epoch_end = (epoch + 1) * cfg.steps_per_epoch
        epoch_sums: dict[str, list[float]] = {}
        window_sums: dict[str, list[float]] = {}
        window_start, window_steps = time.perf_counter(), 0
        # Held by the trainer, not only by this frame: when a stop unwinds this loop, tearing down a
        # multi-worker iterator mid-epoch can block; the process exits right after a stop instead.
        self._iterator = iter(dataset)
        # On a terminal, a bar for the epoch replaces the step log lines (TensorBoard gets the same scalars).
        step = int(self.step.numpy())
        bar = console.progress_bar(f"epoch {epoch + 1}/{cfg.epochs}", cfg.steps_per_epoch,
                                   step - epoch * cfg.steps_per_epoch)
        while step < epoch_end:
            # Up to steps_per_loop steps in one call, ending on the next log, checkpoint or epoch boundary: the
            # host reads the step and the metrics, and checks for a stop, only there.
            count = loop_length(step, cfg.steps_per_loop, epoch_end, (cfg.log_every_steps, cfg.checkpoint_every_steps))
            metrics = self.run_steps(self._iterator, count)
            step = int(self.step.numpy())
            for name, (total, samples) in metrics.items():
                for sums in (epoch_sums, window_sums):
                    acc = sums.setdefault(name, [0.0, 0.0])
                    acc[0] += total
                    acc[1] += samples
            window_steps += count
            if bar is not None:
                bar.update(step - epoch * cfg.steps_per_epoch, {k: s / max(c, 1.0) for k, (s, c) in epoch_sums.items()})
            if step % cfg.log_every_steps == 0:
                seconds = time.perf_counter() - window_start
                scalars = {k: s / max(c, 1.0) for k, (s, c) in window_sums.items()}
                scalars["samples_per_sec"] = window_steps * cfg.samples_per_step / max(seconds, 1e-9)
                scalars["learning_rate"] = float(current_lr(self.groups[0].optimizer))
                self._write_scalars(scalars, "train")
                log.log(
                    logging.DEBUG if bar is not None else logging.INFO,
                    "epoch %d step %d/%d  %s",
                    epoch + 1, step - epoch * cfg.steps_per_epoch, cfg.steps_per_epoch,
                    "  ".join(f"{k}={v:.4g}" for k, v in scalars.items()),
                )
                window_sums, window_start, window_steps = {}, time.perf_counter(), 0
            at_epoch_end = step == epoch_end
            if self.stop_agreed and not at_epoch_end:  # at an epoch end, fit() evaluates and saves first
                self._save_and_stop(step)
            if step % cfg.checkpoint_every_steps == 0 and not at_epoch_end:
                self._save(step)
        for _ in self._iterator:  # the epoch's dataset ends here, as each iterator did when a loop drained it
            raise RuntimeError(f"the dataset of epoch {epoch + 1} has more than {cfg.steps_per_epoch} batches")
        console.close_progress()
        return {f"train_{k}": s / max(c, 1.0) for k, (s, c) in epoch_sums.items()}

    def _save(self, step: int) -> None:
        """Checkpoint `step` as one unit (job/units.py): its companions first, so that the index naming it finds
        them, then TF's files and index; companions of the checkpoints the manager drops go with them."""
        prefix = self._ckpt_dir / f"{units.CHECKPOINT_NAME}-{step}"
        if self.cluster.is_chief:
            units.stamp(prefix, self._history, self._best_path)
        self.manager.save(checkpoint_number=step)
        if self.cluster.is_chief:
            units.sweep(self._ckpt_dir, self.manager.checkpoints)

    def _adopt(self, prefix: Path) -> None:
        """Resume with the restored checkpoint's own history and best weights, not whatever is beside it."""
        self._restored = units.companions(prefix)
        if self._restored is not None:
            units.adopt_best_weights(self._restored, self._best_path)

    def _save_and_stop(self, step: int) -> None:
        self._save(step)
        self.writer.flush()
        self.cluster.barrier("checkpoint saved")  # no worker exits (the launcher stops the others) before all saved
        log.warning("Stop requested: checkpoint saved at step %d", step)
        raise Preempted(step)

    def _agreed_metric(self, value: float | None) -> float | None:
        """The mean of `value` over workers, so every worker takes the same early-stopping decision."""
        if value is None or self.cluster.num_workers <= 1:
            return value
        strategy = self.cluster.strategy
        per_replica = strategy.run(lambda: tf.constant(value, tf.float32))
        return float(strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None))

    def _early_stopping(self, value: float | None) -> bool:
        if value is None:
            return False
        if value > float(self.best.numpy()):
            self.best.assign(value)
            self.bad_epochs.assign(0)
            with atomic_path(self._best_path) as tmp:  # a stop signal mid-write leaves the previous best
                self.model.save_weights(tmp)
        else:
            self.bad_epochs.assign_add(1)
        return self.config.patience > 0 and int(self.bad_epochs.numpy()) >= self.config.patience

    def _write_scalars(self, scalars: dict[str, float], prefix: str) -> None:
        with self.writer.as_default(step=int(self.step.numpy())):
            for name, value in scalars.items():
                tf.summary.scalar(f"{prefix}/{name}", value)

    def _load_history(self, completed_epochs: int) -> list[dict[str, float]]:
        if self._restored is not None:
            return [h for h in self._restored.history if h["epoch"] <= completed_epochs]
        path = self.directory / HISTORY_FILE
        if not path.is_file():
            return []
        fix = "delete it to resume without the earlier epochs' history, or rerun with --force"
        return [h for h in read_json(path, fix) if h["epoch"] <= completed_epochs]

    def _save_history(self, history: list[dict[str, float]]) -> None:
        if self.cluster.is_chief:
            write_json(self.directory / HISTORY_FILE, history)

    def evaluation_statistics(self) -> contextlib.AbstractContextManager:
        """Inside: BatchNorm moving statistics corrected for their (0, 1) start, as Adam corrects moments."""
        if not self.config.fresh_batchnorm:
            return contextlib.nullcontext()
        return debiased_batchnorm(self.model, int(self.step.numpy()))

    def finalize(self, use_best: bool = True) -> None:
        """Leave the model with its final inference weights: the best epoch's, else the last, debiased."""
        path = self._best_path
        if use_best and path.is_file():
            self.model.load_weights(path)  # saved inside evaluation_statistics(): already debiased
        elif self.config.fresh_batchnorm:
            debias_batchnorm(self.model, int(self.step.numpy()))

    def close(self) -> None:
        self.writer.close()
        if self._ckpt_dir != self.directory / CHECKPOINT_DIR:
            shutil.rmtree(self._ckpt_dir, ignore_errors=True)


def _checkpointed_step(manager: tf.train.CheckpointManager) -> int:
    """The global step of the manager's latest checkpoint (0 without one): where training resumes."""
    latest = manager.latest_checkpoint
    return int(tf.train.load_checkpoint(latest).get_tensor(STEP_KEY)) if latest else 0
