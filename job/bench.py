"""`python -m job bench`: input pipeline and training throughput on the same data and model config.

1. seed_pipeline_samples_per_sec: the reference notebook's input path (image_dataset_from_directory →
   per-image resize, scale and one random rotation → batch(128) → prefetch), rebuilt for comparison only;
2. pipeline_samples_per_sec: this project's pretext pipeline exactly as training consumes it (augmentation and
   the four rotations included; a sample is one rotated image, so images/s is a quarter of it);
3. train_samples_per_sec_synthetic: the training step on a batch already in memory;
4. train_samples_per_sec: the training step fed by the real pipeline, runtime.steps_per_loop steps per traced call
   as training runs them;
5. train_samples_per_sec_steps_per_loop_1 / _n: 4 at one step per call (a host sync after every step) and at
   steps_per_loop_n steps per call (runtime.steps_per_loop, or runtime.log_every_steps when that is 1: the
   longest loop the run's logging allows), and loop_speedup = n / 1. All three run the one traced loop of
   steps_per_loop_n steps at most (a call's length is a tensor), so they differ only in host syncs;
6. pipeline_speedup = 2 / 1, input_efficiency = 4 / 3, peak RSS (after the decode, after both pipelines, at
   the end), the decoded payload (uint8 train + val) it compares with, and the first epoch's decode rate (a
   fresh decode into a scratch cache, which the rest of the benchmark then reads memory-mapped as runs do);
7. data_store: how the pretext held its train images (`data.store`: "encoded" also encodes them on first use).
Each measurement excludes warm-up, is repeated, and the median is reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import resource
import statistics
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tensorflow as tf

from job.data import ROOT_NAME
from job.pipelines import NUM_ROTATIONS

log = logging.getLogger(__name__)

SEED_BATCH = 128
SEED_IMAGE_SIZE = 64
KIB, MB = 1024, 1024 * 1024


def _median_rate(run: Callable[[], int], repeats: int) -> float:
    """Median samples/s over `repeats` calls of `run` (each returns the samples it processed)."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        samples = run()
        rates.append(samples / (time.perf_counter() - start))
    return statistics.median(rates)


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB / MB


def _drain(iterator: Iterator, batches: int, samples_of: Callable) -> int:
    total = 0
    for _ in range(batches):
        total += samples_of(next(iterator))
    return total


def _train_steps(trainer, iterator, batches: int, steps_per_loop: int) -> None:
    """`batches` train steps on batches from `iterator`, `steps_per_loop` per traced call (the rest in a last one)."""
    done = 0
    while done < batches:
        count = min(steps_per_loop, batches - done)
        trainer.run_steps(iterator, count)
        done += count


def seed_pipeline(train_dir: Path, image_size: int = SEED_IMAGE_SIZE) -> tf.data.Dataset:
    """The reference notebook's input path, for comparison only."""
    import keras

    # Keras prints "Found N files." to stdout, which would corrupt `bench --json`: it goes to the log instead.
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        images = keras.utils.image_dataset_from_directory(
            str(train_dir), image_size=(image_size, image_size), batch_size=None, label_mode=None, shuffle=True,
            seed=0,
        )
    log.debug("Reference pipeline: %s", printed.getvalue().strip())

    def rotate(image):
        image = tf.image.resize(image, (image_size, image_size)) / 255.0
        k = tf.random.uniform((), 0, 4, dtype=tf.int32)
        return tf.image.rot90(image, k), k

    return images.map(rotate, num_parallel_calls=tf.data.AUTOTUNE).batch(SEED_BATCH).prefetch(tf.data.AUTOTUNE)


def _extracted_train_dir(data_path: Path, workdir: Path) -> Path:
    """A directory with train/<wnid>/images/*.JPEG for image_dataset_from_directory."""
    if data_path.is_dir():
        root = data_path / ROOT_NAME if (data_path / ROOT_NAME).is_dir() else data_path
        return root / "train"
    with zipfile.ZipFile(data_path) as archive:
        members = [m for m in archive.namelist() if "/train/" in m and m.lower().endswith((".jpeg", ".jpg"))]
        archive.extractall(workdir, members)  # data.py has already refused unsafe member names
    return workdir / ROOT_NAME / "train"


def run_bench(ctx, batches: int, repeats: int) -> dict:
    """All measurements on the data and config of `ctx` (a stages.Context)."""
    from job.pretext import pretext_task

    results: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        # The first epoch's cost: decode into a fresh cache, as a first run does. The cache is then read back
        # memory-mapped, exactly as every later run reads it, and the decoded copy is dropped.
        ctx.config.data.cache_dir = str(scratch_dir / "decoded")
        fresh = ctx.dataset
        results["decode_images_per_sec"] = (len(fresh.train) + len(fresh.val)) / fresh.decode_seconds
        results["payload_mb"] = (fresh.train.images.nbytes + fresh.val.images.nbytes) / MB
        del ctx.dataset, fresh
        results["peak_rss_mb_after_decode"] = _peak_rss_mb()

        seed = seed_pipeline(_extracted_train_dir(ctx.data_path, scratch_dir))
        seed_iter = iter(seed.repeat())
        _drain(seed_iter, 2, lambda b: 0)
        results["seed_pipeline_samples_per_sec"] = _median_rate(
            lambda: _drain(seed_iter, batches, lambda b: int(b[0].shape[0])), repeats
        )

        task = pretext_task(ctx)
        samples = lambda b: int(b["images"].shape[0])  # noqa: E731
        pipeline = iter(task.dataset_fn(range(1), 0, None).repeat())
        _drain(pipeline, 2, samples)
        results["pipeline_samples_per_sec"] = _median_rate(lambda: _drain(pipeline, batches, samples), repeats)
        results["pipeline_images_per_sec"] = results["pipeline_samples_per_sec"] / NUM_ROTATIONS
        results["peak_rss_mb_after_pipelines"] = _peak_rss_mb()

        strategy, runtime = ctx.cluster.strategy, ctx.config.runtime
        per_step, configured = task.loop.samples_per_step, runtime.steps_per_loop
        looped = configured if configured > 1 else runtime.log_every_steps
        # One trainer, its loop traced once: a call of `steps` steps runs `steps` steps of the same graph, so one
        # step per call and `looped` per call differ only in the host syncs between calls (one traced model, one
        # set of weights and optimizer slots in memory, as in a run).
        trainer = dataclasses.replace(task, loop=dataclasses.replace(task.loop, steps_per_loop=looped)).trainer(
            ctx.cluster, scratch_dir / "bench", scratch_dir / "tb"
        )

        def rates(iterator, settings: tuple[int, ...]) -> dict[int, float]:
            """Median samples/s at each number of steps per call, the settings' repeats interleaved (a shared
            machine's load then weighs on all of them alike); one warm-up each (the first traces the step)."""
            settings = tuple(dict.fromkeys(settings))
            for steps_per_loop in settings:
                _train_steps(trainer, iterator, batches, steps_per_loop)
            measured: dict[int, list[float]] = {steps_per_loop: [] for steps_per_loop in settings}
            for _ in range(repeats):
                for steps_per_loop in settings:
                    start = time.perf_counter()
                    _train_steps(trainer, iterator, batches, steps_per_loop)
                    measured[steps_per_loop].append(batches * per_step / (time.perf_counter() - start))
            return {steps_per_loop: statistics.median(r) for steps_per_loop, r in measured.items()}

        fixed = strategy.distribute_datasets_from_function(
            lambda c: task.dataset_fn(range(1), 0, c).take(1).cache().repeat()
        )
        results["train_samples_per_sec_synthetic"] = rates(iter(fixed), (configured,))[configured]
        distributed = iter(
            strategy.distribute_datasets_from_function(lambda c: task.dataset_fn(range(1), 0, c).repeat())
        )
        fed = rates(distributed, (configured, 1, looped))
        results["train_samples_per_sec"] = fed[configured]
        results["steps_per_loop_n"] = looped
        results["train_samples_per_sec_steps_per_loop_1"] = fed[1]
        results["train_samples_per_sec_steps_per_loop_n"] = fed[looped]
        results["loop_speedup"] = fed[looped] / fed[1]
        trainer.close()

    results["pipeline_speedup"] = results["pipeline_samples_per_sec"] / results["seed_pipeline_samples_per_sec"]
    results["input_efficiency"] = results["train_samples_per_sec"] / results["train_samples_per_sec_synthetic"]
    results["peak_rss_mb"] = _peak_rss_mb()
    results["train_images"] = int(len(ctx.dataset.train))
    results["image_size"] = ctx.config.data.image_size
    results["data_store"] = ctx.config.data.store
    results["batch_images"] = ctx.config.pretext.batch_images
    return results


def format_table(results: dict) -> str:
    width = max(len(k) for k in results)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for key, value in results.items():
        shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def to_json(results: dict) -> str:
    return json.dumps({k: (float(v) if isinstance(v, np.floating) else v) for k, v in results.items()}, indent=2)
