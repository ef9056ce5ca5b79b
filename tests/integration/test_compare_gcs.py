"""`job compare` on run directories in a GCS emulator, beside a local one."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from job.cli import main
from job.layout import RunLayout
from tests.unit.test_cli_errors import one_line_error
from tests.unit.test_compare import metrics, table, write_run

pytestmark = pytest.mark.slow


def test_compare_reads_runs_from_the_bucket(tmp_path, gcs_emulator):
    bucket = gcs_emulator.client().bucket(gcs_emulator.bucket)
    local = write_run(tmp_path / "local", metrics(0.52, [0.9, 0.8], 0.96, 0.89, 2_600), seed=0)
    remote = write_run(tmp_path / "remote", metrics(0.54, [0.8, 0.8], 0.88, 0.90, 2_800), seed=1)
    layout = RunLayout(remote)
    for path in (layout.metrics, layout.config, layout.run_record):
        bucket.blob(f"runs/seed1/{path.relative_to(remote).as_posix()}").upload_from_filename(path)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    uri = f"gs://{gcs_emulator.bucket}/runs/seed1"

    result = CliRunner().invoke(main, ["compare", str(local), uri, *cache])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "| measure | local (seed 0) | seed1 (seed 1) | mean ± std |" in result.stdout
    assert table(result.stdout)["2% labels: Δ scratch"] == ["+10.0", "+5.0", "+7.5 ± 2.5"]

    absent = f"gs://{gcs_emulator.bucket}/runs/absent"
    assert absent in one_line_error(CliRunner().invoke(main, ["compare", str(local), absent, *cache]))
