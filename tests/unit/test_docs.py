"""README.md says what the code does: its exit-code table lists every code the command line uses."""

from __future__ import annotations

import re
from pathlib import Path

from job import errors
from job.cli import EXIT_PREEMPTED

README = Path(__file__).resolve().parents[2] / "README.md"
CLICK_USAGE_ERROR = 2  # click's UsageError.exit_code
UNCAUGHT_EXCEPTION = 1  # Python's exit status after a traceback


def _documented_codes() -> set[int]:
    text = README.read_text()
    table = text[text.index("| code | meaning |"):]
    table = table[: table.index("\n\n")]
    return {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}


def test_every_exit_code_is_documented():
    job_errors = {cls.exit_code for cls in vars(errors).values()
                  if isinstance(cls, type) and issubclass(cls, errors.JobError)}
    assert {2, 3, 4} <= job_errors  # bad input, storage, full disk (and any added since)
    used = {0, UNCAUGHT_EXCEPTION, CLICK_USAGE_ERROR, EXIT_PREEMPTED, *job_errors}
    assert _documented_codes() == used


def test_every_module_is_in_the_readme_module_table():
    """A new module gets its row in the README's table of what each module holds."""
    text = README.read_text()
    modules = sorted(p for p in (README.parent / "job").glob("*.py") if not p.name.startswith("__"))
    assert modules
    missing = [f"job/{p.name}" for p in modules if f"`job/{p.name}`" not in text]
    assert not missing, f"not in README's module table: {missing}"
