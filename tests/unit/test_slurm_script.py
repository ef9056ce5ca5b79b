"""slurm/train.sh without a cluster: its syntax, its #SBATCH requests, and the job command it builds (run with a
stand-in `srun` that records its arguments). tests/integration/test_slurm.py submits it to a real Slurm."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from job.config import load_config

REPO = Path(__file__).resolve().parents[2]
TRAIN_SH = REPO / "slurm" / "train.sh"
FAKE_SRUN = '#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n'

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _directives() -> dict[str, str]:
    found = {}
    for line in TRAIN_SH.read_text().splitlines():
        if match := re.fullmatch(r"#SBATCH --([a-z-]+)(?:=(\S+))?", line.strip()):
            found[match.group(1)] = match.group(2) or ""
    return found


def _job_command(tmp_path: Path, *extra: str, **env: str) -> list[str]:
    """The arguments train.sh hands to srun (after srun's own options) in this environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(0o755)
    record = tmp_path / "srun-args"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JOB_")) and k != "TMPDIR"}
    full_env = {**clean, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_ARGS": str(record), **env}
    result = subprocess.run(["bash", str(TRAIN_SH), *extra], env=full_env, capture_output=True, text=True,
                            timeout=30, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    args = record.read_text().splitlines()
    return args[args.index("-m"):]  # from `-m job ...`, srun's options and the interpreter before it


def _sets(args: list[str]) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(TRAIN_SH)], check=True, timeout=30)


def test_memory_is_requested_per_gpu():
    directives = _directives()
    assert re.fullmatch(r"\d+G", directives.get("mem-per-gpu", "")), directives
    assert "mem" not in directives and "mem-per-cpu" not in directives  # sbatch: mutually exclusive
    assert directives["gpus-per-task"] == "1"


@pytest.mark.parametrize("variable", ["SLURM_TMPDIR", "TMPDIR"])
def test_the_cache_goes_to_node_local_scratch(tmp_path, variable):
    scratch = tmp_path / "scratch"
    args = _job_command(tmp_path, **{variable: str(scratch)})
    assert _sets(args) == [f"data.cache_dir={scratch}/rotnet-job"]


def test_slurm_tmpdir_wins_over_tmpdir_and_job_cache_dir_over_both(tmp_path):
    args = _job_command(tmp_path, SLURM_TMPDIR="/local/job", TMPDIR="/tmp")
    assert _sets(args) == ["data.cache_dir=/local/job/rotnet-job"]
    args = _job_command(tmp_path, SLURM_TMPDIR="/local/job", JOB_CACHE_DIR="/shared/cache")
    assert _sets(args) == ["data.cache_dir=/shared/cache"]


def test_without_scratch_the_job_keeps_its_default_cache(tmp_path):
    assert _sets(_job_command(tmp_path)) == []


def test_a_cache_dir_in_job_set_or_the_arguments_wins(tmp_path):
    args = _job_command(tmp_path, "--set", "data.cache_dir=/mine", SLURM_TMPDIR="/local/job",
                        JOB_SET="pretext.epochs=2")
    sets = _sets(args)
    assert sets == ["data.cache_dir=/local/job/rotnet-job", "pretext.epochs=2", "data.cache_dir=/mine"]
    assert load_config("demo", sets).data.cache_dir == "/mine"  # later overrides win


def test_the_header_example_uses_real_config_keys():
    """Every `--set 'KEY=VALUE'` shown in the script's comments loads."""
    examples = re.findall(r"--set '([^']+)'", TRAIN_SH.read_text())
    assert examples
    for example in examples:
        load_config("demo", [example])
