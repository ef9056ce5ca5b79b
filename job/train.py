"""One custom training loop for every stage: distributed steps, checkpoints, resume, TensorBoard, early stop.

Knows nothing of Tiny ImageNet or rotations: a stage hands it a model, an objective (batch → per-example
loss and metric sums), parameter groups with their optimizers, a dataset factory and an evaluator. The traced
step is job/trainstep.py's, the checkpointed state and early stopping job/trainstate.py's, the optimizers
job/optim.py's, the BatchNorm correction job/batchnorm.py's.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import tensorflow as tf

from job import console
from job.batchnorm import debias_batchnorm, debiased_batchnorm
from job.distribute import Cluster
from job.optim import GroupedOptimizer, ParamGroup, WarmupCosine, current_lr, loss_scaled, make_optimizer
from job.summaries import drop_steps_after
from job.trainstate import BEST_WEIGHTS, HISTORY_FILE, TrainState
from job.trainstep import Batch, Objective, loop_length, make_train_loop

# Callers import these from here too (the trainer's parts live in job/optim.py, job/trainstep.py,
# job/trainstate.py, job/batchnorm.py).
__all__ = [
    "BEST_WEIGHTS", "HISTORY_FILE", "STOP_REQUESTED", "Batch", "GroupedOptimizer", "LoopConfig", "LoopResult",
    "Objective", "ParamGroup", "Preempted", "Trainer", "WarmupCosine", "debias_batchnorm", "debiased_batchnorm",
    "loop_length", "loss_scaled", "make_optimizer",
]

log = logging.getLogger(__name__)

DatasetFn = Callable[[range, int, tf.distribute.InputContext], tf.data.Dataset]  # (epochs, start_step, ctx)
Evaluator = Callable[[int, tf.summary.SummaryWriter], dict[str, float]]  # (epoch, writer) -> val metrics


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
    eval_every_epochs: int = 1  # the evaluator runs after every so many epochs, and after the last

    def evaluates(self, epoch: int) -> bool:
        """Whether the evaluator runs after `epoch` (0-based): every `eval_every_epochs`-th epoch and the last."""
        return (epoch + 1) % self.eval_every_epochs == 0 or epoch + 1 == self.epochs

    def checkpoints_at(self, step: int) -> bool:
        """Whether a fit checkpoints after `step` (besides at its end and on a stop request)."""
        return step % self.checkpoint_every_steps == 0

    def epochs_since_evaluation(self, epoch: int) -> int:
        """Epochs trained since the evaluation before `epoch`'s (0-based): early stopping counts epochs, not
        evaluations."""
        return epoch + 1 - epoch // self.eval_every_epochs * self.eval_every_epochs


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
        self.state = TrainState(cluster, model, groups, directory, config.keep_checkpoints, config.patience)
        self.step = self.state.step
        if cluster.is_chief:  # the steps after the checkpoint are redone: their old events must not show twice
            drop_steps_after(tensorboard_dir, self.state.checkpointed_step())
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
        step = self.state.restore(self.config.steps_per_epoch)
        if step:
            log.info("Resumed from %s at step %d", self.state.restored_from, step)
        return step

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
        cfg, strategy, state = self.config, self.cluster.strategy, self.state
        start = self.restore()
        first_epoch = start // cfg.steps_per_epoch
        train_seconds = sum(h.get("epoch_seconds", 0.0) for h in state.history)
        stopped = state.early_stopping.spent
        epochs = range(first_epoch, first_epoch if stopped else cfg.epochs)
        if epochs:
            # One dataset and one iterator for the whole fit (the epochs follow each other in it). Held by the
            # trainer, not only by this frame: when a stop unwinds this loop, tearing down a multi-worker
            # iterator mid-epoch can block; the process exits right after a stop instead.
            begin = state.global_step - first_epoch * cfg.steps_per_epoch
            self._iterator = iter(strategy.distribute_datasets_from_function(
                lambda ctx: dataset_fn(epochs, begin, ctx)
            ))
        for epoch in epochs:
            epoch_start = time.perf_counter()
            train_metrics = self._run_epoch(epoch)
            epoch_seconds = time.perf_counter() - epoch_start
            train_seconds += epoch_seconds
            val_metrics = {}
            if cfg.evaluates(epoch):  # the same epochs on every worker: the early-stopping mean needs them all
                with self.evaluation_statistics(), self.writer.as_default(step=state.global_step):
                    val_metrics = evaluator(epoch, self.writer)  # its summaries at the global step, as the scalars
                    stopped = state.early_stopping.update(self._agreed_metric(val_metrics.get(cfg.monitor)),
                                                          epochs=cfg.epochs_since_evaluation(epoch))
                self._write_scalars(val_metrics, "val")
            record = {"epoch": epoch + 1, "epoch_seconds": epoch_seconds, **train_metrics, **val_metrics}
            # A checkpoint at the fit's end and at checkpoint_every_steps multiples, not at every epoch end: a
            # downstream epoch of 5 steps took ~0.5 s and its checkpoint ~0.3 s more. A stop saves its own, below.
            last = stopped or epoch == epochs[-1]
            state.end_epoch(record, checkpoint=not self.stop_agreed and (last or cfg.checkpoints_at(state.global_step)))
            log.info(
                "epoch %d/%d  %s  (%.0f s)",
                epoch + 1, cfg.epochs, "  ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"),
                epoch_seconds,
            )
            if self.stop_agreed:
                self._save_and_stop()
            if stopped:
                log.info("Early stopping: %s did not improve for %d epochs", cfg.monitor, cfg.patience)
                break
        else:
            if epochs:  # every epoch ran: the fit's dataset must end here
                for _ in self._iterator:
                    raise RuntimeError(f"the dataset has more than {cfg.steps_per_epoch} batches an epoch")
        self.writer.flush()
        steps = state.global_step
        done_samples = steps * cfg.samples_per_step
        return LoopResult(
            epochs=len(state.history),
            steps=steps,
            train_seconds=train_seconds,
            samples_per_sec=done_samples / train_seconds if train_seconds else 0.0,
            best=float(state.early_stopping.best.numpy()),
            stopped_early=stopped,
            history=state.history,
        )

    def _run_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.config
        epoch_end = (epoch + 1) * cfg.steps_per_epoch
        epoch_sums: dict[str, list[float]] = {}
        window_sums: dict[str, list[float]] = {}
        window_start, window_steps = time.perf_counter(), 0
        # On a terminal, a bar for the epoch replaces the step log lines (TensorBoard gets the same scalars).
        step = self.state.global_step
        bar = console.progress_bar(f"epoch {epoch + 1}/{cfg.epochs}", cfg.steps_per_epoch,
                                   step - epoch * cfg.steps_per_epoch)
        while step < epoch_end:
            # Up to steps_per_loop steps in one call, ending on the next log, checkpoint or epoch boundary: the
            # host reads the step and the metrics, and checks for a stop, only there.
            count = loop_length(step, cfg.steps_per_loop, epoch_end, (cfg.log_every_steps, cfg.checkpoint_every_steps))
            metrics = self.run_steps(self._iterator, count)
            step = self.state.global_step
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
                self._save_and_stop()
            if cfg.checkpoints_at(step) and not at_epoch_end:
                self.state.save()
        console.close_progress()
        return {f"train_{k}": s / max(c, 1.0) for k, (s, c) in epoch_sums.items()}

    def _save_and_stop(self) -> None:
        self.state.save()
        self.writer.flush()
        self.cluster.barrier("checkpoint saved")  # no worker exits (the launcher stops the others) before all saved
        log.warning("Stop requested: checkpoint saved at step %d", self.state.global_step)
        raise Preempted(self.state.global_step)

    def _agreed_metric(self, value: float | None) -> float | None:
        """The mean of `value` over workers, so every worker takes the same early-stopping decision."""
        if value is None or self.cluster.num_workers <= 1:
            return value
        strategy = self.cluster.strategy
        per_replica = strategy.run(lambda: tf.constant(value, tf.float32))
        return float(strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None))

    def _write_scalars(self, scalars: dict[str, float], prefix: str) -> None:
        with self.writer.as_default(step=self.state.global_step):
            for name, value in scalars.items():
                tf.summary.scalar(f"{prefix}/{name}", value)

    def evaluation_statistics(self) -> contextlib.AbstractContextManager:
        """Inside: BatchNorm moving statistics corrected for their (0, 1) start, as Adam corrects moments."""
        if not self.config.fresh_batchnorm:
            return contextlib.nullcontext()
        return debiased_batchnorm(self.model, self.state.global_step)

    def finalize(self, use_best: bool = True) -> None:
        """Leave the model with its final inference weights: the best epoch's, else the last, debiased."""
        path = self.state.best_path
        if use_best and path.is_file():
            self.model.load_weights(path)  # saved inside evaluation_statistics(): already debiased
        elif self.config.fresh_batchnorm:
            debias_batchnorm(self.model, self.state.global_step)

    def best_record(self) -> dict[str, float] | None:
        """The history record of the epoch whose weights `finalize(use_best=True)` loads (the first that reached
        the best monitored value), or None when that is not known (no best weights saved; several workers
        agreed on a mean). Its validation metrics are what evaluating the finalized model gives: the same
        weights, saved as that epoch evaluated them."""
        if not self.state.best_path.is_file() or self.cluster.num_workers > 1:
            return None
        best = float(self.state.early_stopping.best.numpy())
        return next((r for r in self.state.history if r.get(self.config.monitor) == best), None)

    def close(self) -> None:
        self.writer.close()
        self.state.close()
        self._release_iterator()

    def _release_iterator(self) -> None:
        """Drop the fit's iterator on a thread: its teardown waits for tf.data's autotuning thread to wake, which
        held the main thread for up to ~20 s after a downstream run (89-113 s of a cpu-real protocol's).

        Not a daemon thread: the interpreter's exit waits for it. A daemon thread still inside TensorFlow's teardown
        when the interpreter finalizes is ended by a forced unwind through C++ frames, and the process aborts
        ("FATAL: exception not rethrown", exit -6) after a run that succeeded."""
        if self._iterator is not None:  # no local reference: the thread's arguments hold the last one
            thread = threading.Thread(target=_drop, args=(self._iterator,), name="release-iterator")
            self._iterator = None
            thread.start()


def _drop(iterator) -> None:
    """A thread's target holding the last reference to `iterator`: the thread frees it when it ends."""
    del iterator
