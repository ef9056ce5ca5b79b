"""Tests for job.cli: help texts; user errors as one `error: ...` line with exit code 2, losing nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from job.cli import main
from job.layout import RunLayout
from job.synth import ROOT_NAME
from job.train import HISTORY_FILE

JOB_COMMANDS = ["run", "pretrain", "finetune", "evaluate"]
MISSING_WNID = "n00000001"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A single-process CPU cluster whatever the environment, and the SIGTERM handler restored afterwards."""
    for name in ("TF_CONFIG", "CLUSTER_SPEC", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_line_error(result: Result) -> str:
    """The single `error: ...` line of a JobError exit; fails on a traceback or a click usage error."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()  # log lines may precede it if logging goes to stderr
    errors = [line for line in lines if line.startswith("error: ")]  # not click's "Error: ..." usage message
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert result.stdout == "", result.stdout
    return errors[0]


def cache_set(tmp_path: Path) -> list[str]:
    return ["--set", f"data.cache_dir={tmp_path / 'cache'}"]


def flat(text: str) -> str:
    """Help text with its line wrapping undone."""
    return " ".join(text.split())


# -- help ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", JOB_COMMANDS)
def test_job_command_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    for option in ("--data", "--output", "--config", "--set", "--force"):
        assert option in text
    assert "[default: demo]" in text
    assert "SECTION.KEY=VALUE" in text
    assert text.count("required]") == 1  # --data; --output may come from JOB_OUTPUT or Vertex's AIP_MODEL_DIR
    assert "[env var: JOB_DATA; required]" in text and "[env var: JOB_OUTPUT]" in text
    assert "AIP_MODEL_DIR" in text
    assert "TF_CPP_MIN_LOG_LEVEL" in text and "JOB_ALLOCATOR" in text
    assert "job/config.py" in text  # where each config key is documented
    for code in ("0", "2", "3", "4", "143"):
        assert f" {code} " in text.split("Exit codes:")[1]
    assert "--log-level" in text


def test_synth_help():
    result = invoke("synth", "--help")
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "--output" in text and "[required]" in text
    assert "--force" in text and "Exit codes: 0" in text
    for option, default in (("--classes", 10), ("--per-class", 40), ("--val-per-class", 10),
                            ("--test-images", 10), ("--image-size", 64), ("--seed", 0)):
        assert option in text
        assert f"[default: {default}]" in text


def test_main_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    text = flat(result.output)
    for command in [*JOB_COMMANDS, "synth"]:
        assert command in text
    assert "[default: INFO]" in text


def test_missing_required_option_is_a_usage_error():
    result = invoke("run", "--output", "x")
    assert result.exit_code == 2
    assert "--data" in result.output
    assert "error: " not in result.stderr  # click's own message, not a JobError line


# -- user errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", JOB_COMMANDS)
def test_missing_data_path(tmp_path, command):
    missing = tmp_path / "no-such-data.zip"
    result = invoke(command, "--data", str(missing), "--output", str(tmp_path / "out"), *cache_set(tmp_path))
    line = one_line_error(result)
    assert str(missing) in line
    assert not (tmp_path / "out").exists()  # nothing created for a run that cannot start


def test_unsupported_data_scheme(tmp_path):
    out = str(tmp_path / "out")
    result = invoke("run", "--data", "ftp://host/data.zip", "--output", out, *cache_set(tmp_path))
    assert "ftp://host/data.zip" in one_line_error(result)


def test_unknown_override_key(tmp_path, synth_zip):
    result = invoke("run", "--data", str(synth_zip), "--output", str(tmp_path / "out"),
                    "--set", "pretext.nope=1")
    line = one_line_error(result)
    assert "pretext.nope" in line
    assert not (tmp_path / "out").exists()


def test_unknown_data_store(tmp_path, synth_zip):
    """data.store takes "decoded" or "encoded": another value is one line naming the key and both (exit 2)."""
    result = invoke("bench", "--data", str(synth_zip), "--set", "data.store=jpeg")
    assert one_line_error(result) == ("error: data.store = 'jpeg' is not allowed: use one of ['decoded', 'encoded'].")


def test_malformed_override(tmp_path, synth_zip):
    result = invoke("pretrain", "--data", str(synth_zip), "--output", str(tmp_path / "out"),
                    "--set", "pretext.epochs")
    assert "pretext.epochs" in one_line_error(result)


def test_missing_config_file(tmp_path, synth_zip):
    config = tmp_path / "absent.toml"
    out = str(tmp_path / "out")
    result = invoke("run", "--data", str(synth_zip), "--output", out, "--config", str(config))
    assert str(config) in one_line_error(result)


def test_dataset_without_wnids(tmp_path, synth_zip):
    data = tmp_path / "no-wnids.zip"
    with zipfile.ZipFile(synth_zip) as source, zipfile.ZipFile(data, "w") as target:
        for info in source.infolist():
            if info.filename != f"{ROOT_NAME}/wnids.txt":
                target.writestr(info, source.read(info))
    result = invoke("run", "--data", str(data), "--output", str(tmp_path / "out"), *cache_set(tmp_path))
    line = one_line_error(result)
    assert "wnids.txt" in line
    assert str(data) in line


def test_finetune_without_pretrained_backbone(tmp_path, synth_zip):
    out = tmp_path / "out"
    result = invoke("finetune", "--data", str(synth_zip), "--output", str(out), *cache_set(tmp_path))
    line = one_line_error(result)
    assert "backbone.keras" in line and "pretrain" in line


def _previous_run(out: Path) -> dict[Path, bytes]:
    """Files a previous invocation left in --output, at the paths the job uses (RunLayout): an unrelated note,
    its config and run record (which a new invocation rewrites once its checks pass), and a finished pretrain
    stage made with other settings (which `--force` discards once its checks pass), so that an invocation that
    wrote or deleted anything before failing would be caught."""
    layout = RunLayout(out)
    other_settings = {"fingerprint": {"settings": {"model.alpha": 0.5}, "data": {"uri": "/elsewhere/data.zip"}}}
    files = {
        out / "notes.txt": b"keep me\n",
        layout.config: b'{"model": {"alpha": 0.5}}',
        layout.run_record: b'{"data": {"uri": "/elsewhere/data.zip"}}',
        layout.backbone: b"not really a model",
        layout.pretext / HISTORY_FILE: b"[]",
        RunLayout.done(layout.pretext): json.dumps({"val_rotation_accuracy": 0.5, **other_settings}).encode(),
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _assert_untouched(out: Path, kept: dict[Path, bytes]) -> None:
    """`out` holds exactly the files `_previous_run` left, unchanged."""
    assert {p for p in out.rglob("*") if p.is_file()} == set(kept)
    for path, content in kept.items():
        assert path.read_bytes() == content, path


def test_downstream_wnid_absent_from_data_finetune(tmp_path, synth_zip):
    """finetune fails on the unknown class as soon as it has read wnids.txt, before decoding any image."""
    out = tmp_path / "out"
    kept = _previous_run(out)
    result = invoke("finetune", "--data", str(synth_zip), "--output", str(out), *cache_set(tmp_path),
                    "--set", f'data.downstream_wnids=["{MISSING_WNID}","n01855672"]')
    line = one_line_error(result)
    assert MISSING_WNID in line
    assert "data.downstream_wnids" in line
    _assert_untouched(out, kept)
    assert not (tmp_path / "cache" / "decoded").exists()


def test_downstream_wnid_absent_from_data_run(tmp_path, synth_zip):
    """`run` with an unknown downstream class fails in its checks, before pretraining: exit 2 naming the class,
    --output as it was."""
    out = tmp_path / "out"
    kept = _previous_run(out)
    result = invoke("run", "--data", str(synth_zip), "--output", str(out), *cache_set(tmp_path),
                    "--set", f'data.downstream_wnids=["{MISSING_WNID}","n01855672"]')
    line = one_line_error(result)
    assert MISSING_WNID in line
    _assert_untouched(out, kept)


def test_error_keeps_existing_output(tmp_path, synth_zip):
    """A run that fails on its input leaves what --output held untouched."""
    out = tmp_path / "out"
    kept = _previous_run(out)
    data = tmp_path / "broken.zip"
    data.write_bytes(b"not a zip")
    result = invoke("run", "--data", str(data), "--output", str(out), *cache_set(tmp_path))
    assert str(data) in one_line_error(result)
    _assert_untouched(out, kept)


def test_force_with_bad_data_keeps_previous_results(tmp_path, synth_zip):
    """--force redoes stages, but a run that cannot even read its data should not discard earlier results."""
    out = tmp_path / "out"
    kept = _previous_run(out)
    data = tmp_path / "missing.zip"
    data.write_bytes(b"not a zip")
    result = invoke("run", "--data", str(data), "--output", str(out), "--force", *cache_set(tmp_path))
    assert str(data) in one_line_error(result)
    _assert_untouched(out, kept)


def test_synth_error_is_one_line(tmp_path):
    result = invoke("synth", "--output", str(tmp_path / "s.zip"), "--classes", "1")
    line = one_line_error(result)
    assert "classes" in line and str(tmp_path / "s.zip") in line
    assert not (tmp_path / "s.zip").exists()


def test_synth_refuses_to_overwrite_directory(tmp_path):
    target = tmp_path / "data"
    (target / ROOT_NAME).mkdir(parents=True)
    (target / ROOT_NAME / "wnids.txt").write_text("mine\n")
    result = invoke("synth", "--output", str(target), "--classes", "2", "--per-class", "1",
                    "--val-per-class", "1", "--test-images", "0", "--image-size", "16")
    line = one_line_error(result)
    assert str(target) in line
    assert (target / ROOT_NAME / "wnids.txt").read_text() == "mine\n"


def test_synth_writes_a_loadable_zip(tmp_path):
    from job.data import load_dataset

    path = tmp_path / "s.zip"
    result = invoke("synth", "--output", str(path), "--classes", "3", "--per-class", "2",
                    "--val-per-class", "1", "--test-images", "0", "--image-size", "16")
    assert result.exit_code == 0, result.output
    assert "6 train" in result.output and "3 val" in result.output
    data = load_dataset(path, 16, threads=1)
    assert len(data.wnids) == 3 and len(data.train) == 6 and len(data.val) == 3


def test_output_defaults_to_the_vertex_base_output_directory(monkeypatch):
    from job.cli import vertex_output

    monkeypatch.setenv("AIP_MODEL_DIR", "gs://b/runs/x/model/")
    monkeypatch.setenv("AIP_CHECKPOINT_DIR", "gs://b/runs/x/checkpoints/")
    monkeypatch.setenv("AIP_TENSORBOARD_LOG_DIR", "gs://b/runs/x/logs/")
    assert vertex_output() == "gs://b/runs/x"


def test_missing_output_without_vertex_is_a_clear_error(synth_zip, monkeypatch):
    monkeypatch.delenv("AIP_MODEL_DIR", raising=False)
    monkeypatch.delenv("JOB_OUTPUT", raising=False)
    result = invoke("pretrain", "--data", str(synth_zip))
    assert result.exit_code == 2
    assert "--output is missing" in result.output


@pytest.mark.parametrize("command", ["bench", "predict"])
def test_other_commands_help_lists_exit_codes(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Exit codes:" in result.output and "[required]" in flat(result.output)


def test_log_level_is_accepted_after_the_command_too(tmp_path, monkeypatch):
    """`python -m job synth ... --log-level debug` (it was `No such option: --log-level`), in any case."""
    import logging

    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)  # restored afterwards: the CLI sets it

    result = invoke("synth", "--output", str(tmp_path / "s.zip"), "--classes", "2", "--per-class", "1",
                    "--val-per-class", "1", "--test-images", "0", "--image-size", "16", "--log-level", "debug")
    assert result.exit_code == 0, result.output
    assert logging.getLogger().level == logging.DEBUG
    result = invoke("--log-level", "warning", "synth", "--output", str(tmp_path / "t.zip"), "--classes", "2",
                    "--per-class", "1", "--val-per-class", "1", "--test-images", "0", "--image-size", "16")
    assert result.exit_code == 0, result.output
    assert logging.getLogger().level == logging.WARNING
    invoke("--log-level", "info", "--help")


def test_synth_per_class_zero_is_one_line_naming_the_option(tmp_path):
    result = invoke("synth", "--output", str(tmp_path / "s.zip"), "--per-class", "0")
    line = one_line_error(result)
    assert "--per-class must be >= 1" in line
    assert not (tmp_path / "s.zip").exists()


def test_synth_refuses_to_overwrite_a_zip_without_force(tmp_path):
    path = tmp_path / "s.zip"
    path.write_bytes(b"mine")
    small = ["--classes", "2", "--per-class", "1", "--val-per-class", "1", "--test-images", "0", "--image-size", "16"]
    line = one_line_error(invoke("synth", "--output", str(path), *small))
    assert str(path) in line and "--force" in line
    assert path.read_bytes() == b"mine"
    result = invoke("synth", "--output", str(path), *small, "--force")
    assert result.exit_code == 0, result.output
    assert zipfile.is_zipfile(path)


def test_demo_recipe_on_real_sized_data_warns_and_names_the_real_recipes(tmp_path, synth_zip, monkeypatch, caplog):
    """The default config on more images than a demo set says it is the demo recipe and names cpu-real / t4
    (here the limit is lowered to the test set's size; finetune without a backbone then stops the run)."""
    import logging

    monkeypatch.setattr("job.cli.DEMO_MAX_TRAIN_IMAGES", 10)
    caplog.set_level(logging.WARNING, logger="job")
    result = invoke("finetune", "--data", str(synth_zip), "--output", str(tmp_path / "out"), *cache_set(tmp_path))
    assert "backbone.keras" in one_line_error(result)
    (warning,) = [r.getMessage() for r in caplog.records if "demo recipe" in r.getMessage()]
    assert "--config cpu-real" in warning and "--config t4" in warning and "32 train images" in warning
    caplog.clear()
    result = invoke("finetune", "--data", str(synth_zip), "--output", str(tmp_path / "out"), *cache_set(tmp_path),
                    "--config", "cpu-real")
    assert "backbone.keras" in one_line_error(result)
    assert not [r for r in caplog.records if "demo recipe" in r.getMessage()]


@pytest.mark.slow
def test_user_error_is_the_first_and_only_line_of_stderr(tmp_path, synth_zip):
    """In a process of its own, as a user runs it: no TensorFlow lines before the one `error:` line (there were
    seven, one of them `failed call to cuInit`); `--log-level debug` after the command shows TensorFlow's."""
    import re

    from tests.jobproc import REPO, job_env

    args = [sys.executable, "-m", "job", "finetune", "--data", str(synth_zip), "--output", str(tmp_path / "out"),
            "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", f'data.downstream_wnids=["{MISSING_WNID}","n01855672"]']
    env = {k: v for k, v in job_env().items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    quiet = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 2, quiet.stderr
    assert quiet.stderr.splitlines() == [quiet.stderr.strip()] and quiet.stderr.startswith(
        f"error: class {MISSING_WNID} is not in {synth_zip}:{ROOT_NAME}/wnids.txt"), quiet.stderr
    loud = subprocess.run([*args, "--log-level", "debug"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert loud.returncode == 2
    assert [line for line in loud.stderr.splitlines() if re.match(r"[IWE]\d{4} ", line)], loud.stderr
    assert loud.stderr.splitlines()[-1] == quiet.stderr.strip()
