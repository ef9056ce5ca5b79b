"""`job predict` with the model and the images in a GCS emulator: a run directory, a SavedModel, a prefix."""

from __future__ import annotations

import csv
import io
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from job.cli import main
from job.layout import RunLayout
from tests.unit.test_cli_errors import one_line_error
from tests.unit.test_serving import encode, smooth_images

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _restore_sigterm() -> Iterator[None]:
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def _upload_tree(bucket, root: Path, prefix: str) -> None:
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        bucket.blob(f"{prefix}/{path.relative_to(root).as_posix()}").upload_from_filename(path)


def _predict(*args: str) -> list[dict[str, str]]:
    result = CliRunner().invoke(main, ["predict", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return list(csv.DictReader(io.StringIO(result.stdout)))


def test_predict_from_the_bucket(tiny_run, tmp_path, gcs_emulator):
    bucket = gcs_emulator.client().bucket(gcs_emulator.bucket)
    layout = RunLayout(tiny_run)
    bucket.blob("runs/tiny/config.json").upload_from_filename(layout.config)
    bucket.blob("runs/tiny/model/classifier.keras").upload_from_filename(layout.classifier)
    _upload_tree(bucket, layout.classifier_savedmodel, "runs/tiny/model/classifier_savedmodel")
    for index, image in enumerate(smooth_images(3, 40, 40)):
        bucket.blob(f"new/img{index}.jpg").upload_from_string(encode(image, "JPEG"))
    bucket.blob("new/broken.png").upload_from_string(b"not a png")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    run, images = f"gs://{gcs_emulator.bucket}/runs/tiny", f"gs://{gcs_emulator.bucket}/new/"

    from_run = _predict("--model", run, images, *cache)
    assert [row["path"] for row in from_run] == [f"{images}img{k}.jpg" for k in range(3)]
    from_savedmodel = _predict("--model", f"{run}/model/classifier_savedmodel", images, *cache)
    assert [row["class"] for row in from_savedmodel] == [row["class"] for row in from_run]

    missing = f"gs://{gcs_emulator.bucket}/runs/absent"
    assert missing in one_line_error(CliRunner().invoke(main, ["predict", "--model", missing, images, *cache]))
