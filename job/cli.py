"""Command line: `python -m job run | pretrain | finetune | evaluate | synth | bench | predict`."""

from __future__ import annotations

import functools
import gc
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import click

from job.config import DEFAULT_CONFIG, DataConfig, available_configs, load_config
from job.errors import DISK_FULL_TEXTS, DiskFullError, JobError, from_os_error
from job.predict import PREDICT_BATCH

log = logging.getLogger("job")

EXIT_PREEMPTED = 143  # stopped by SIGTERM/SIGUSR1 after checkpointing; rerun to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("absl").setLevel(logging.WARNING)


def _user_errors(function: Callable) -> Callable:
    """Turn JobError into one line on stderr and its exit code; SIGTERM into a clean exit."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        sys.unraisablehook, sys.excepthook = _quiet_disk_full_unraisable, _quiet_disk_full_excepthook
        for signum in STOP_SIGNALS:
            signal.signal(signum, _request_stop)
        try:
            return function(*args, **kwargs)
        except JobError as err:
            fault = err
        except Exception as err:
            train = sys.modules.get("job.train")  # not imported before: TensorFlow takes seconds to load
            if train is not None and isinstance(err, train.Preempted):
                click.echo(f"preempted: {err}; rerun the same command to resume.", err=True)
                # Everything is saved and synced; skip TensorFlow's slow multi-worker teardown (tens of seconds).
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(EXIT_PREEMPTED)
            if (fault := from_os_error(err)) is None:  # a full disk or an unwritable path: not a bug
                raise
            log.debug("%s", err, exc_info=True)
        # Drop the traceback, and with its frames whatever a failed write left open, while _quiet_disk_full
        # still listens.
        fault.__traceback__ = fault.__cause__ = fault.__context__ = None
        click.echo(f"error: {fault}", err=True)
        _exit_after_failed_writes(fault.exit_code)

    return wrapper


def _exit_after_failed_writes(code: int) -> None:
    """Exit with `code`. When a failed write (a full disk) left HDF5 objects open, skip the interpreter's exit
    handlers: HDF5's own crashes on a half-written Keras weights file (exit 139 instead of `code`)."""
    gc.collect()
    if _hdf5_files_open():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _hdf5_files_open() -> bool:
    """Whether HDF5 still holds a file, group, dataset or attribute open (h5py keeps datatypes open itself)."""
    h5py = sys.modules.get("h5py")  # loaded with Keras, only by commands that train
    if h5py is None:
        return False
    h5f = h5py.h5f
    return bool(h5f.get_obj_ids(types=h5f.OBJ_FILE | h5f.OBJ_GROUP | h5f.OBJ_DATASET | h5f.OBJ_ATTR))


def _is_disk_full(exc: BaseException | None) -> bool:
    return exc is not None and (isinstance(from_os_error(exc), DiskFullError)
                                or any(text in str(exc) for text in DISK_FULL_TEXTS))


def _quiet_disk_full_unraisable(unraisable) -> None:
    """h5py files a full disk interrupted fail again as they are closed: log those instead of a traceback."""
    if _is_disk_full(unraisable.exc_value):
        log.debug("ignored while closing %r: %s", unraisable.object, unraisable.exc_value)
        return
    sys.__unraisablehook__(unraisable)


def _quiet_disk_full_excepthook(kind, value, traceback) -> None:
    """The same for h5py's Cython deallocators, which print through sys.excepthook first."""
    if _is_disk_full(value):
        log.debug("ignored: %s", value)
        return
    sys.__excepthook__(kind, value, traceback)


def _request_stop(signum, frame):
    """First signal: checkpoint after the current step and exit. Second: exit at once."""
    from job.train import STOP_REQUESTED

    if STOP_REQUESTED.is_set():
        log.warning("Received signal %d again: exiting now", signum)
        sys.exit(EXIT_PREEMPTED)
    log.warning("Received signal %d: saving a checkpoint after this step, then exiting", signum)
    STOP_REQUESTED.set()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
              help="Logging verbosity.")
def main(log_level: str) -> None:
    """Self-supervised rotation pretraining of MobileNetV2 on Tiny ImageNet, then fish-vs-duck transfer."""
    _setup_logging(log_level)


def _job_options(function: Callable) -> Callable:
    options = [
        click.option("--data", envvar="JOB_DATA", required=True,
                     help="Tiny ImageNet: a local zip or directory, gs://bucket/file.zip, gs://bucket/prefix/ "
                          "or an https:// URL."),
        click.option("--output", envvar="JOB_OUTPUT", default=None,
                     help="Run directory: a local path or gs://bucket/prefix. Default: $JOB_OUTPUT, else the "
                          "base output directory of a Vertex AI job (the parent of $AIP_MODEL_DIR)."),
        click.option("--config", "config_name", default=DEFAULT_CONFIG,
                     help=f"Config name ({', '.join(available_configs())}) or path to a TOML file."),
        click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                     help="Override one config value; repeatable (e.g. --set pretext.epochs=5)."),
        click.option("--force", is_flag=True, default=False, help="Redo stages whose results are already in --output."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _execute(stage_names: list[str], data: str, output: str, config_name: str, overrides: tuple[str, ...],
             force: bool) -> None:
    from job import rundir
    from job.files import write_json
    from job.layout import RunLayout
    from job.storage import fetch_dataset
    from job.sync import open_output

    config = load_config(config_name, overrides)
    output = output or vertex_output()
    cache = Path(config.data.cache_dir).expanduser()
    if "://" not in output:
        rundir.check_output_dir(Path(output))
    local_output, syncer = open_output(output, cache / "runs", config.runtime.sync_interval_s)
    if syncer is not None:
        pulled = syncer.pull()
        log.info("Pulled %d files of %s into %s", pulled, output, local_output)
    data_path = fetch_dataset(data, cache / "downloads")
    from job import stages  # TensorFlow: imported once the data is there (a bad --data fails in seconds)
    from job.context import check_model, make_deterministic
    from job.distribute import make_cluster

    if config.runtime.deterministic:
        make_deterministic(config.runtime.seed)
    cluster = make_cluster(config.runtime.slurm_port_base)
    for signum in STOP_SIGNALS:  # TensorFlow's multi-worker runtime installs its own SIGTERM handler
        signal.signal(signum, _request_stop)
    layout = RunLayout(local_output)
    identity = rundir.data_identity(data, data_path)
    context = stages.Context(config, layout, data_path, cluster, force, data_identity=identity)
    # Every check before anything in the output is deleted or rewritten.
    stages.check_inputs(context)
    check_model(context)
    rundir.check_reuse(layout, config, identity, stage_names, force)
    if force:
        context.force_record = rundir.ForceRecord.load(layout, os.environ)
    if cluster.is_chief:
        for stale in rundir.stale_results(layout, config, identity, stage_names, force):
            log.info("--force: discarding %s, made with other settings or data", stale)
            shutil.rmtree(stale)
        local_output.mkdir(parents=True, exist_ok=True)
        write_json(layout.config, config.to_dict())
        write_json(layout.run_record, {"data": identity, "commands": stage_names})
    if syncer is not None and cluster.is_chief:
        syncer.start()
    steps = {"pretrain": stages.pretrain, "finetune": stages.finetune, "evaluate": stages.evaluate}
    final_sync = syncer if syncer is not None and cluster.is_chief else None
    try:
        for name in stage_names:
            log.info("== %s ==", name)
            steps[name](context)
    except BaseException:
        if final_sync is not None:  # push what there is, but a failed push must not replace the job's own error
            try:
                log.info("Synced %s: %s", output, final_sync.close())
            except Exception as err:  # noqa: BLE001 - logged; the job's exception follows
                log.error("Final sync to %s failed: %s", output, err)
        raise
    if final_sync is not None:
        log.info("Synced %s: %s", output, final_sync.close())
    if "evaluate" in stage_names and cluster.is_chief:
        click.echo(f"Report: {output.rstrip('/')}/report/report.md")


def vertex_output() -> str:
    """The run directory of a Vertex AI custom job: its base output directory, whose model/, checkpoints/
    and logs/ are AIP_MODEL_DIR, AIP_CHECKPOINT_DIR and AIP_TENSORBOARD_LOG_DIR (job/layout.py)."""
    model_dir = os.environ.get("AIP_MODEL_DIR")
    if not model_dir:
        raise JobError("--output is missing: pass --output DIR_OR_GS_URI (or set JOB_OUTPUT).")
    base = model_dir.rstrip("/").rsplit("/", 1)[0]
    for variable, name in (("AIP_CHECKPOINT_DIR", "checkpoints"), ("AIP_TENSORBOARD_LOG_DIR", "logs")):
        expected = f"{base}/{name}"
        if os.environ.get(variable, expected).rstrip("/") != expected:
            log.warning("%s=%s is not %s: the job writes %s under %s", variable, os.environ[variable], expected,
                        name, base)
    log.info("Output from Vertex AI's AIP_MODEL_DIR: %s", base)
    return base


def _stage_command(name: str, stage_names: list[str], help_text: str) -> None:
    @main.command(name=name, help=help_text)
    @_job_options
    @_user_errors
    def command(data, output, config_name, overrides, force):
        _execute(stage_names, data, output, config_name, overrides, force)


_stage_command("run", ["pretrain", "finetune", "evaluate"],
               "The whole job: pretrain, finetune, evaluate and report (complete stages are skipped).")
_stage_command("pretrain", ["pretrain"], "Rotation pretext training of the backbone.")
_stage_command("finetune", ["finetune"], "Transfer the pretrained backbone to the downstream task.")
_stage_command("evaluate", ["evaluate"], "Probes, k-NN, scratch baseline, label efficiency and the report.")


@main.command()
@click.option("--output", required=True, type=click.Path(path_type=Path),
              help="Where to write: FILE.zip, or a directory that will hold tiny-imagenet-200/.")
@click.option("--classes", default=10, help="Number of classes (the two downstream wnids first).")
@click.option("--per-class", default=40, help="Train images per class.")
@click.option("--downstream-per-class", default=None, type=int,
              help="Train images for each of the two downstream classes (default: --per-class).")
@click.option("--val-per-class", default=10, help="Val images per class.")
@click.option("--test-images", default=10, help="Unlabelled test images.")
@click.option("--image-size", default=64, help="Image side in pixels.")
@click.option("--seed", default=0, help="Random seed; the same seed gives the same files.")
@_user_errors
def synth(output: Path, classes: int, per_class: int, downstream_per_class: int | None, val_per_class: int,
          test_images: int, image_size: int, seed: int) -> None:
    """Generate a synthetic dataset in the Tiny ImageNet layout (learnable orientation, fish vs duck)."""
    from job.synth import make_synthetic_dataset

    try:
        summary = make_synthetic_dataset(
            output, classes=classes, per_class=per_class, val_per_class=val_per_class, test_images=test_images,
            image_size=image_size, seed=seed, downstream_per_class=downstream_per_class,
        )
    except (ValueError, FileExistsError) as err:
        raise JobError(f"cannot write {output}: {err}") from err
    click.echo(f"Wrote {summary.train_images} train, {summary.val_images} val and {summary.test_images} test "
               f"images of {len(summary.wnids)} classes to {summary.path}")


@main.command()
@click.option("--data", required=True, help="Tiny ImageNet as for `run` (local path, gs://, https://).")
@click.option("--config", "config_name", default=DEFAULT_CONFIG, help="Config name or TOML file.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one config value.")
@click.option("--batches", default=20, help="Batches per measurement.")
@click.option("--repeats", default=3, help="Measurements per quantity; the median is reported.")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON instead of a table.")
@_user_errors
def bench(data: str, config_name: str, overrides: tuple[str, ...], batches: int, repeats: int, as_json: bool) -> None:
    """Measure input pipeline and training throughput (seed pipeline vs this one, step with and without input)."""
    import tempfile

    from job import bench as benchmark
    from job import stages
    from job.distribute import make_cluster
    from job.layout import RunLayout
    from job.storage import fetch_dataset

    config = load_config(config_name, overrides)
    cache = Path(config.data.cache_dir).expanduser()
    data_path = fetch_dataset(data, cache / "downloads")
    if config.runtime.deterministic:
        from job.context import make_deterministic

        make_deterministic(config.runtime.seed)
    with tempfile.TemporaryDirectory() as scratch:
        context = stages.Context(config, RunLayout(Path(scratch)), data_path, make_cluster())
        results = benchmark.run_bench(context, batches, repeats)
    click.echo(benchmark.to_json(results) if as_json else benchmark.format_table(results))


@main.command(epilog="Exit codes: 0 every readable image predicted (unreadable ones are skipped with a warning); "
                     "2 a user error (missing model, no images found, none readable); 3 object storage failed.")
@click.option("--model", "model", required=True, metavar="RUN_OR_MODEL",
              help="A run directory (local or gs://; its config.json gives the image size and class names), "
                   "a .keras classifier or a SavedModel directory (model/classifier_savedmodel).")
@click.argument("images", nargs=-1, required=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the CSV here instead of printing it.")
@click.option("--batch-size", default=PREDICT_BATCH, type=click.IntRange(min=1), help="Images per model call.")
@click.option("--cache-dir", default=DataConfig().cache_dir, help="Where gs:// models and images are downloaded.")
@_user_errors
def predict(model: str, images: tuple[str, ...], output: Path | None, batch_size: int, cache_dir: str) -> None:
    """Classify IMAGES (files, folders, zips, gs:// objects or prefixes) with a trained model.

    Prints (or writes to --output) CSV: path, predicted class, then each class's probability.
    """
    import csv

    from job.predict import run_predict

    downloads = Path(cache_dir).expanduser() / "downloads"
    if output is None:
        writer = csv.writer(click.get_text_stream("stdout"), lineterminator="\n")
        run_predict(model, images, writer.writerow, downloads, batch_size)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    try:
        with partial.open("w", newline="") as stream:
            run_predict(model, images, csv.writer(stream, lineterminator="\n").writerow, downloads, batch_size)
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
    click.echo(f"Predictions: {output}")
