"""Command line: `python -m job run | pretrain | finetune | evaluate | synth | bench | predict`."""

from __future__ import annotations

import functools
import gc
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import click

from job import console, testhooks
from job.config import (
    DEFAULT_CONFIG,
    DEMO_MAX_TRAIN_IMAGES,
    REAL_DATA_CONFIGS,
    DataConfig,
    available_configs,
    load_config,
)
from job.errors import DISK_FULL_TEXTS, DiskFullError, JobError, from_os_error
from job.predict import PREDICT_BATCH

log = logging.getLogger("job")

EXIT_PREEMPTED = 143  # stopped by SIGTERM/SIGUSR1 after checkpointing; rerun to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EXIT_CODES_HELP = """\b
Exit codes:
  0    done (or every stage already complete)
  1    a bug: an unexpected exception, printed with its traceback
  2    bad input: one line `error: ...` naming it and the fix (a usage error too)
  3    object storage or download (gs://, https://) failed
  4    the disk (or quota) is full: free space, rerun the same command to resume
  5    multi-worker: a worker failed or a barrier timed out (runtime.barrier_timeout_s)
  143  stopped by SIGTERM/SIGUSR1 after a checkpoint: rerun the same command to resume"""
ENVIRONMENT_HELP = """\b
Environment:
  JOB_DATA, JOB_OUTPUT       --data, --output
  AIP_MODEL_DIR              Vertex AI: --output defaults to its parent
  TF_CONFIG, CLUSTER_SPEC    multi-worker clusters (as do Slurm's SLURM_* variables)
  GOOGLE_APPLICATION_CREDENTIALS, STORAGE_EMULATOR_HOST   gs:// credentials, an emulator
  JOB_ALLOCATOR=system       no tcmalloc re-exec on CPU
  TF_CPP_MIN_LOG_LEVEL       TensorFlow's C++ lines (default: hidden, shown with --log-level debug)"""
CONFIG_HELP = ("Config keys: each with its default and meaning in job/config.py; the named configs are "
               "job/configs/*.toml (README: Configuration).")
JOB_EPILOG = f"{CONFIG_HELP}\n\n{ENVIRONMENT_HELP}\n\n{EXIT_CODES_HELP}"


def _log_level_option(default: str | None) -> Callable:
    """--log-level, accepted before the command (the group's, INFO by default) and after it (overrides)."""
    return click.option(
        "--log-level", default=default, type=click.Choice(LOG_LEVELS, case_sensitive=False), expose_value=False,
        is_eager=True, callback=lambda ctx, param, value: value and console.configure(value),
        help="Logging verbosity; DEBUG also shows TensorFlow's own lines.",
    )


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
                _exit_now(EXIT_PREEMPTED)  # everything is saved and synced
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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
             epilog=f"{ENVIRONMENT_HELP}\n\n{EXIT_CODES_HELP}")
@_log_level_option("INFO")
def main() -> None:
    """Self-supervised rotation pretraining of MobileNetV2 on Tiny ImageNet, then fish-vs-duck transfer.

    Run `python -m job COMMAND --help` for a command's options.
    """


def _job_options(function: Callable) -> Callable:
    options = [
        click.option("--data", envvar="JOB_DATA", show_envvar=True, required=True,
                     help="Tiny ImageNet: a local zip or directory, gs://bucket/file.zip, gs://bucket/prefix/ "
                          "or an https:// URL."),
        click.option("--output", envvar="JOB_OUTPUT", show_envvar=True, default=None,
                     help="Run directory: a local path or gs://bucket/prefix. Default: $JOB_OUTPUT, else the "
                          "base output directory of a Vertex AI job (the parent of $AIP_MODEL_DIR)."),
        click.option("--config", "config_name", default=DEFAULT_CONFIG,
                     help=f"Config name ({', '.join(available_configs())}) or path to a TOML file."),
        click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                     help="Override one config value; repeatable (e.g. --set pretext.epochs=5). "
                          "--SECTION.KEY=VALUE does the same (as Vertex AI passes a tuning trial's values)."),
        click.option("--force", is_flag=True, default=False, help="Redo stages whose results are already in --output."),
        click.option("--take-over", is_flag=True, default=False,
                     help="Write a gs:// --output whose lease another job holds (only when that job is dead)."),
        _log_level_option(None),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _execute(stage_names: list[str], data: str, output: str, config_name: str, overrides: tuple[str, ...],
             force: bool, take_over: bool = False) -> None:
    from job import hypertune, rundir
    from job.fetch import fetch_dataset
    from job.files import write_json
    from job.layout import RunLayout
    from job.sync import check_output_uri, open_output

    config = load_config(config_name, overrides)
    output = output or vertex_output()
    cache = Path(config.data.cache_dir).expanduser()
    check_output_uri(output)
    if "://" not in output:
        rundir.check_output_dir(Path(output))
    data_path = fetch_dataset(data, cache / "downloads", config.data.sha256 or None)
    console.import_tensorflow()  # once the data is there (a bad --data fails in seconds)
    from job import stages
    from job.context import check_model
    from job.distribute import make_cluster
    from job.precision import make_deterministic
    from job.train import Preempted

    if config.runtime.deterministic:
        make_deterministic(config.runtime.seed)
    cluster = make_cluster(config.runtime)
    for signum in STOP_SIGNALS:  # TensorFlow's multi-worker runtime installs its own SIGTERM handler
        signal.signal(signum, _request_stop)
    # The chief trains in the mirror of a gs:// output; other workers pull into mirrors of their own.
    mirror = "" if cluster.is_chief else f"-worker{cluster.worker_index}"
    local_output, syncer = open_output(output, cache / "runs", config.runtime.sync_interval_s, mirror=mirror)
    if syncer is not None and cluster.is_chief:  # one job per output, before the mirror is touched
        syncer.acquire(rundir.job_identity(os.environ), take_over)
    try:
        if syncer is not None:
            pulled = syncer.pull()
            log.info("Pulled %d files of %s into %s", pulled, output, local_output)
        layout = RunLayout(local_output)
        identity = rundir.data_identity(data, data_path)
        context = stages.Context(config, layout, data_path, cluster, force, data_identity=identity)
        # Every check before anything in the output is deleted or rewritten.
        stages.check_inputs(context)
        _warn_demo_recipe(config_name, len(context.dataset.train))
        check_model(context)
        rundir.check_reuse(layout, config, identity, stage_names, force)
        if force:
            context.force_record = rundir.ForceRecord.load(layout, os.environ)
        if syncer is not None and cluster.is_chief:  # a stage --force clears is cleared in the bucket too
            context.clear_remote = lambda stage_dir: syncer.clear(stage_dir.relative_to(local_output).as_posix())
        cluster.barrier("checks")  # every worker has read the output before the chief changes it
        if cluster.is_chief:
            for stale in rundir.stale_results(layout, config, identity, stage_names, force):
                log.info("--force: discarding %s (and its TensorBoard logs), made with other settings or data", stale)
                context.discard(stale)
            local_output.mkdir(parents=True, exist_ok=True)
            write_json(layout.config, config.to_dict())
            write_json(layout.run_record, {"data": identity, "commands": stage_names})
    except BaseException:
        if syncer is not None and cluster.is_chief:
            syncer.release()
        raise
    if syncer is not None and cluster.is_chief:
        syncer.start()
    steps = {"pretrain": stages.pretrain, "finetune": stages.finetune, "evaluate": stages.evaluate}
    final_sync = syncer if syncer is not None and cluster.is_chief else None
    results = {}
    try:
        for number, name in enumerate(stage_names, 1):
            log.info("== %s ==", name)
            results[name] = steps[name](context)
            if number < len(stage_names):
                _stage_boundary(cluster, syncer, name)
    except BaseException as err:
        preempted = isinstance(err, Preempted)
        if preempted:
            testhooks.chief_delay(cluster, "final push")
        if final_sync is not None:  # push what there is, but a failed push must not replace the job's own error
            try:
                log.info("Synced %s: %s", output, final_sync.close())
            except Exception as push_error:  # noqa: BLE001 - logged; the job's exception follows
                log.error("Final sync to %s failed: %s", output, push_error)
        if preempted:
            # Every worker saved the same step; none exits (and has srun or Vertex stop the others) before the
            # chief's push of it ended.
            try:
                cluster.barrier("final push")
                cluster.leave()
            except JobError as barrier_error:
                log.error("%s", barrier_error)
        raise
    if final_sync is not None:
        log.info("Synced %s: %s", output, final_sync.close())
    if "evaluate" in stage_names and cluster.is_chief:
        hypertune.report(results["evaluate"], os.environ)  # a Vertex AI tuning trial's metrics; else nothing
        click.echo(f"Report: {output.rstrip('/')}/report/report.md")
    if cluster.num_workers > 1:
        # All exit together: a worker gone for long is reported by the others as crashed.
        cluster.barrier("end")
        cluster.leave()
        _exit_now(0)


def _stage_boundary(cluster, syncer, name: str) -> None:
    """Every worker waits for the chief's results of stage `name`; the others then read them from --output.

    With a gs:// output the chief pushes them first and the others pull them into their own mirrors; a local
    output is one directory that every worker reads (a shared file system)."""
    if cluster.num_workers <= 1:
        return
    if cluster.is_chief and syncer is not None:
        syncer.push()
    cluster.barrier(f"{name} done")
    if not cluster.is_chief and syncer is not None:
        log.info("Pulled %d files of %s after %s", syncer.pull(), syncer.remote, name)


def _exit_now(code: int) -> None:
    """Exit at once after flushing the logs: TensorFlow's multi-worker teardown takes tens of seconds."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _warn_demo_recipe(config_name: str, train_images: int) -> None:
    """The default config on real data (thousands of images) is almost always a missing --config."""
    if config_name == DEFAULT_CONFIG and train_images > DEMO_MAX_TRAIN_IMAGES:
        recipes = "; ".join(f"--config {name}: {what}" for name, what in REAL_DATA_CONFIGS.items())
        log.warning("--config %s is the 32 px demo recipe for `make demo`'s synthetic data, not for these %d train "
                    "images: for real data pass %s", DEFAULT_CONFIG, train_images, recipes)


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


# Vertex AI passes a tuning trial's hyperparameters as `--SECTION.KEY=VALUE` arguments (job/hypertune.py).
TRIAL_ARGUMENTS = {"ignore_unknown_options": True, "allow_extra_args": True}


def _stage_command(name: str, stage_names: list[str], help_text: str) -> None:
    @main.command(name=name, help=help_text, epilog=JOB_EPILOG, context_settings=TRIAL_ARGUMENTS)
    @_job_options
    @click.pass_context
    @_user_errors
    def command(ctx, data, output, config_name, overrides, force, take_over):
        from job.hypertune import overrides_from_args

        overrides = (*overrides, *overrides_from_args(ctx.args))
        _execute(stage_names, data, output, config_name, overrides, force, take_over)


_stage_command("run", ["pretrain", "finetune", "evaluate"],
               "The whole job: pretrain, finetune, evaluate and report (complete stages are skipped).")
_stage_command("pretrain", ["pretrain"], "Rotation pretext training of the backbone.")
_stage_command("finetune", ["finetune"], "Transfer the pretrained backbone to the downstream task.")
_stage_command("evaluate", ["evaluate"],
               "Probes, k-NN, the colour baseline and the report; trains what it compares (the finetune runs, the "
               "scratch runs, a pretrained and a scratch run per seed at each evaluate.label_fractions), reusing "
               "complete ones.")


@main.command(epilog="Exit codes: 0 written; 2 a bad option, or --output exists (pass --force to replace it).")
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
@click.option("--force", is_flag=True, default=False, help="Replace an existing zip or tiny-imagenet-200/.")
@_log_level_option(None)
@_user_errors
def synth(output: Path, classes: int, per_class: int, downstream_per_class: int | None, val_per_class: int,
          test_images: int, image_size: int, seed: int, force: bool) -> None:
    """Generate a synthetic dataset in the Tiny ImageNet layout (learnable orientation, fish vs duck)."""
    from job.synth import make_synthetic_dataset

    try:
        summary = make_synthetic_dataset(
            output, classes=classes, per_class=per_class, val_per_class=val_per_class, test_images=test_images,
            image_size=image_size, seed=seed, downstream_per_class=downstream_per_class, force=force,
        )
    except (ValueError, FileExistsError) as err:
        # The library names its parameters (per_class); the command line has options (--per-class).
        reason = re.sub(r"^([a-z_]+)\b", lambda m: "--" + m[1].replace("_", "-"), str(err))
        raise JobError(f"cannot write {output}: {reason}.") from err
    click.echo(f"Wrote {summary.train_images} train, {summary.val_images} val and {summary.test_images} test "
               f"images of {len(summary.wnids)} classes to {summary.path}")


@main.command(epilog=f"{CONFIG_HELP}\n\n{EXIT_CODES_HELP}")
@click.option("--data", required=True, help="Tiny ImageNet as for `run` (local path, gs://, https://).")
@click.option("--config", "config_name", default=DEFAULT_CONFIG, help="Config name or TOML file.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one config value.")
@click.option("--batches", default=20, help="Batches per measurement.")
@click.option("--repeats", default=3, help="Measurements per quantity; the median is reported.")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON instead of a table.")
@_log_level_option(None)
@_user_errors
def bench(data: str, config_name: str, overrides: tuple[str, ...], batches: int, repeats: int, as_json: bool) -> None:
    """Measure input pipeline and training throughput (seed pipeline vs this one, step with and without input)."""
    import tempfile

    console.import_tensorflow()
    from job import bench as benchmark
    from job import stages
    from job.distribute import make_cluster
    from job.fetch import fetch_dataset
    from job.layout import RunLayout

    config = load_config(config_name, overrides)
    cache = Path(config.data.cache_dir).expanduser()
    data_path = fetch_dataset(data, cache / "downloads", config.data.sha256 or None)
    if config.runtime.deterministic:
        from job.precision import make_deterministic

        make_deterministic(config.runtime.seed)
    with tempfile.TemporaryDirectory() as scratch:
        context = stages.Context(config, RunLayout(Path(scratch)), data_path, make_cluster())
        results = benchmark.run_bench(context, batches, repeats)
    click.echo(benchmark.to_json(results) if as_json else benchmark.format_table(results))


@main.command(epilog="Exit codes: 0 written; 2 a run without a report (or not a run directory); 3 object storage "
                     "failed.")
@click.argument("runs", nargs=-1, required=True)
@click.option("--against", "against", multiple=True, metavar="RUN",
              help="A run of the recipe RUNS are compared with (repeat it for each of its seeds): the table then "
                   "gives each recipe's mean and the difference run by run, paired by runtime.seed.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the markdown table here instead of printing it.")
@click.option("--cache-dir", default=DataConfig().cache_dir, help="Where gs:// runs' result files are downloaded.")
@_log_level_option(None)
@_user_errors
def compare(runs: tuple[str, ...], against: tuple[str, ...], output: Path | None, cache_dir: str) -> None:
    """Replicates side by side: RUNS (run directories, local or gs://) in one markdown table.

    Each run's verdict (rotation, each label fraction against scratch and colour, the frozen features against
    random ones, k-NN, wall time) in its own column, then the mean ± std over the runs: run the same config with
    `--set runtime.seed=1`, `=2`, ... and judge it on the mean. Settings in which the runs differ besides
    runtime.seed are listed under the table. With --against, two recipes: each one's mean, and RUNS − against
    for each seed both have, with the mean ± standard error of those differences.
    """
    from job.compare import comparison_markdown, load_run, recipes_markdown
    from job.files import write_text

    downloads = Path(cache_dir).expanduser() / "downloads"
    loaded = [load_run(run, downloads) for run in runs]
    text = recipes_markdown(loaded, [load_run(run, downloads) for run in against]) if against \
        else comparison_markdown(loaded)
    if output is None:
        click.echo(text, nl=False)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text(output, text)
    click.echo(f"Comparison: {output}")


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
@_log_level_option(None)
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
