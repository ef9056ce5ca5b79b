"""The Dockerfile and .dockerignore, checked without a Docker engine.

A small parser reads the Dockerfile into instructions (comments, line continuations, exec/JSON form) and
a small matcher applies .dockerignore's rules (Docker's: `*`, `?`, `**`, `!` exceptions, the last match
wins, a matched directory excludes its contents). What an engine would do with them is checked here:
the base tag follows requirements.txt's tensorflow pin, the image runs as a non-root user, the entrypoint
is the CLI, every COPY source exists and is in the build context, and the copied files alone run
`python -m job --help` (the image's default command).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
REQUIREMENTS = REPO / "requirements.txt"
README = REPO / "README.md"
PYPROJECT = REPO / "pyproject.toml"
# Long enough for the current step, the final checkpoint and its upload after `docker stop`'s SIGTERM.
MIN_STOP_TIMEOUT_S = 60

INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL", "MAINTAINER",
    "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    value: str  # the arguments as written, continuations joined
    line: int  # where it starts (1-based)

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON-array (exec) form's strings, or None for the shell form."""
        if not self.value.startswith("["):
            return None
        try:
            parsed = json.loads(self.value)
        except json.JSONDecodeError:
            return None
        return parsed if isinstance(parsed, list) and all(isinstance(a, str) for a in parsed) else None

    def flags_and_args(self) -> tuple[dict[str, str], list[str]]:
        """`--name=value` flags (COPY --chown=..., FROM --platform=...) and the remaining words."""
        words = self.exec_form if self.exec_form is not None else self.value.split()
        flags = {}
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        return flags, words


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile; ValueError on an unknown instruction or a dangling continuation."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#"):  # comments (and parser directives) are dropped, even inside a continuation
            continue
        if not pending and not stripped:
            continue
        if not pending:
            start = number
        continued = raw.rstrip().endswith("\\")
        pending.append(raw.rstrip()[:-1] if continued else raw)
        if continued:
            continue
        joined = " ".join(part.strip() for part in pending if part.strip())
        pending = []
        keyword, _, value = joined.partition(" ")
        if keyword.upper() not in INSTRUCTIONS:
            raise ValueError(f"line {start}: unknown instruction {keyword!r}")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
    if pending:
        raise ValueError(f"line {start}: the last instruction ends with a line continuation")
    return instructions


def _dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:].strip() if negated else line
        pattern = re.sub(r"/+", "/", pattern).strip("/")
        if pattern:
            rules.append((negated, re.compile(_glob_to_regex(pattern))))
    return rules


def _glob_to_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(char))
            else:
                body = pattern[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "^" + "".join(out) + "$"


def excluded(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether .dockerignore leaves `path` (relative, '/'-separated) out of the build context."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negated, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            result = not negated
    return result


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def ignore_rules() -> list[tuple[bool, re.Pattern]]:
    return _dockerignore_rules(DOCKERIGNORE.read_text())


def _one(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert found, f"no {keyword} in the Dockerfile"
    return found[-1]  # the one in effect


def _tensorflow_pin() -> str:
    for line in REQUIREMENTS.read_text().splitlines():
        match = re.fullmatch(r"\s*tensorflow\s*==\s*([\w.]+)\s*(#.*)?", line)
        if match:
            return match.group(1)
    raise AssertionError("requirements.txt pins no tensorflow==VERSION")


# -- the parsers themselves ------------------------------------------------------------------------
def test_parser_joins_continuations_and_drops_comments():
    parsed = parse_dockerfile(
        "# syntax=docker/dockerfile:1\nFROM base:1 AS build\n\nRUN a \\\n  # a comment inside\n  && b \\\n  && c\n"
        'entrypoint ["python", "-m", "job"]\nCOPY --chown=1:1 x/ y/\n'
    )
    assert [i.keyword for i in parsed] == ["FROM", "RUN", "ENTRYPOINT", "COPY"]
    assert parsed[1].value == "a && b && c" and parsed[1].line == 4
    assert parsed[2].exec_form == ["python", "-m", "job"]
    assert parsed[3].flags_and_args() == ({"chown": "1:1"}, ["x/", "y/"])


@pytest.mark.parametrize("text", ["FROM a\nRUNN echo\n", "FROM a\nRUN echo \\\n"])
def test_parser_refuses_what_docker_would(text):
    with pytest.raises(ValueError):
        parse_dockerfile(text)


def test_dockerignore_matcher_follows_docker_rules():
    rules = _dockerignore_rules("runs\n**/*.zip\n*.md\n!README.md\n**/__pycache__\n")
    assert excluded("runs/demo/report.md", rules)
    assert excluded("a/b/data.zip", rules) and excluded("data.zip", rules)
    assert excluded("notes.md", rules) and not excluded("README.md", rules)
    assert not excluded("docs/notes.md", rules)  # `*` does not cross directories
    assert excluded("job/__pycache__/cli.cpython-311.pyc", rules) and excluded("__pycache__/x.pyc", rules)
    assert not excluded("job/cli.py", rules)


# -- the Dockerfile --------------------------------------------------------------------------------
def test_dockerfile_is_one_stage_from_the_tensorflow_gpu_image_of_the_pinned_version(instructions):
    assert instructions[0].keyword in ("FROM", "ARG")
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) == 1
    _, words = froms[0].flags_and_args()
    image = words[0]
    reference, _, digest = image.partition("@")
    repository, _, tag = reference.partition(":")
    assert repository == "tensorflow/tensorflow", image
    pin = _tensorflow_pin()
    assert tag == f"{pin}-gpu", f"{image} does not match requirements.txt's tensorflow=={pin}"
    # Pinned by the exact version tag, or also by a digest (never a moving tag such as latest-gpu).
    assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), image


def test_requirements_are_installed_with_pip_without_a_cache(instructions):
    copies = [n for n, i in enumerate(instructions) if i.keyword == "COPY" and "requirements.txt" in i.value]
    installs = [n for n, i in enumerate(instructions) if i.keyword == "RUN" and "pip install" in i.value
                and "-r requirements.txt" in i.value]
    assert copies and installs and copies[0] < installs[0]
    assert "--no-cache-dir" in instructions[installs[0]].value


def test_the_image_runs_as_an_unprivileged_user(instructions):
    user = _one(instructions, "USER").value.split(":")[0]
    assert user not in ("root", "0", ""), user
    last_user = max(n for n, i in enumerate(instructions) if i.keyword == "USER")
    assert all(i.keyword != "RUN" for i in instructions[last_user:]), "a RUN after USER would run as that user"
    created = " ".join(i.value for i in instructions if i.keyword == "RUN")
    assert re.search(rf"useradd\b.*(--uid {user}\b|\b{user}$)", created), f"no useradd for {user}"


def test_entrypoint_is_the_cli_and_the_default_command_is_help(instructions):
    assert _one(instructions, "ENTRYPOINT").exec_form == ["python", "-m", "job"]
    assert _one(instructions, "CMD").exec_form == ["--help"]
    assert _one(instructions, "WORKDIR").value.startswith("/")


def _copy_sources(instructions: list[Instruction]) -> list[str]:
    sources = []
    for instruction in instructions:
        if instruction.keyword in ("COPY", "ADD"):
            flags, words = instruction.flags_and_args()
            assert "from" not in flags, "multi-stage copies are not expected"
            assert len(words) >= 2, instruction
            sources += words[:-1]
    return sources


def test_every_copy_source_exists_and_is_in_the_build_context(instructions, ignore_rules):
    sources = _copy_sources(instructions)
    assert {"requirements.txt", "job/", "models/"} <= set(sources)
    for source in sources:
        path = REPO / source
        assert path.exists(), f"COPY {source}: no such file"
        assert not excluded(source, ignore_rules), f"COPY {source}: excluded by .dockerignore"
        if path.is_dir():
            files = [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
            assert files and not any(excluded(p.relative_to(REPO).as_posix(), ignore_rules) for p in files)


def test_dockerignore_keeps_the_context_small(ignore_rules):
    for path in (".venv/bin/python", "runs/demo/report/metrics.json", ".git/HEAD", "data.zip",
                 "runs/demo-data/tiny-imagenet-synth.zip", "shared/data/tiny-imagenet-200-mini.zip",
                 "tests/unit/test_config.py", "job/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v/x",
                 ".ruff_cache/x", "slurm-12.out"):
        assert excluded(path, ignore_rules), f"{path} would be sent to the Docker daemon"
    for path in ("requirements.txt", "job/cli.py", "job/configs/demo.toml", "models/backbone.py"):
        assert not excluded(path, ignore_rules), f"{path} is needed in the image"


def test_the_copied_files_alone_run_the_cli(instructions, ignore_rules, tmp_path):
    """The image's WORKDIR holds just the COPY sources: `python -m job --help` must work from there."""
    workdir = tmp_path / "app"
    workdir.mkdir()
    for source in _copy_sources(instructions):
        path = REPO / source
        if path.is_dir():
            shutil.copytree(path, workdir / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, workdir / source)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "2"}  # no PYTHONPATH
    for args in (["--help"], ["run", "--help"]):
        result = subprocess.run([sys.executable, "-m", "job", *args], cwd=workdir, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Usage:" in result.stdout
    assert all(name in result.stdout for name in ("--data", "--output", "--config"))


# -- the image's user, cache, labels; the README's docker run ---------------------------------------
def _pairs(instruction: Instruction) -> dict[str, str]:
    """KEY=VALUE words of an ENV or LABEL instruction (quotes removed)."""
    return dict(word.split("=", 1) for word in shlex.split(instruction.value))


def _env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            env.update(_pairs(instruction))
    return env


def test_the_cache_directory_exists_owned_by_the_job_user_and_writable_by_any_user(instructions):
    """data.cache_dir, resolved with the image's HOME, is made by a RUN before USER, owned by the job's user (so a
    named volume mounted there copies that owner) and world-writable with the sticky bit (for --user UID:GID)."""
    from job.config import DataConfig

    home = _env(instructions).get("HOME")
    assert home, "the image sets no HOME: another --user would resolve ~ elsewhere"
    cache = DataConfig().cache_dir.replace("~", home, 1)
    user = _one(instructions, "USER").value.split(":")[0]
    runs = [i.value for i in instructions if i.keyword == "RUN"]
    assert any(re.search(rf"useradd\b.*--home-dir {re.escape(home)}\b", run) for run in runs), runs
    made = [run for run in runs if re.search(rf"install -d -o {user} -g {user} -m 1777 .*{re.escape(cache)}\b", run)]
    assert made, f"no RUN makes {cache} owned by {user} with mode 1777"
    assert f"chmod 1777 {home}" in made[0], "another UID must be able to reach (and write) the home"


def test_oci_labels_describe_the_image(instructions):
    labels: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "LABEL":
            labels.update(_pairs(instruction))
    prefix = "org.opencontainers.image."
    for key in ("title", "description", "version", "base.name"):
        assert labels.get(prefix + key), f"no {prefix}{key} label"
    assert labels[prefix + "version"] == tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    (image,) = [i.flags_and_args()[1][0] for i in instructions if i.keyword == "FROM"]
    assert labels[prefix + "base.name"] == f"docker.io/{image.partition('@')[0]}"


def _readme_docker_runs() -> list[str]:
    """Each `docker run` command of README.md's container section, continuation lines joined."""
    text = README.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line.startswith("docker run") and "rotnet-job" in line]


def test_readme_docker_run_works_for_a_host_user_and_stops_cleanly():
    runs = _readme_docker_runs()
    assert runs, "README.md shows no `docker run … rotnet-job`"
    for run in runs:
        words = shlex.split(run, posix=True)
        assert "--user" in words and words[words.index("--user") + 1] == "$(id -u):$(id -g)", run
        timeout = words[words.index("--stop-timeout") + 1] if "--stop-timeout" in words else "0"
        assert int(timeout) >= MIN_STOP_TIMEOUT_S, run
    gcs = [run for run in runs if "gs://" in run]
    assert gcs, "no gs:// example"
    for run in gcs:
        words = shlex.split(run)
        mounts = [words[i + 1] for i, w in enumerate(words) if w == "-v"]
        creds = [m for m in mounts if "application_default_credentials.json" in m]
        assert creds and creds[0].endswith(":ro"), mounts
        target = creds[0].split(":")[1]
        assert f"GOOGLE_APPLICATION_CREDENTIALS={target}" in words, run
