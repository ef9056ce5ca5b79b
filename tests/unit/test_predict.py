"""`job predict` on a tiny classifier: folders, zips, odd images, every model form, user errors."""

from __future__ import annotations

import csv
import io
import logging
import signal
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner, Result
from PIL import Image

from job.cli import main
from job.data import decode_image
from job.layout import RunLayout
from models.backbone import load_model
from tests.conftest import CLASS_NAMES, TINY_MODEL_SIZE
from tests.unit.test_cli_errors import one_line_error
from tests.unit.test_serving import encode, smooth_images

ATOL = 1e-5
COLUMNS = ["path", "class", *(f"prob_{name}" for name in CLASS_NAMES)]


@pytest.fixture(autouse=True)
def _restore_sigterm() -> Iterator[None]:
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Images of several sizes, modes and formats, one corrupt JPEG and a text file (not an image)."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    pixels = smooth_images(5, 48, 40)
    (root / "a.jpg").write_bytes(encode(pixels[0], "JPEG"))
    (root / "b_gray.png").write_bytes(encode(pixels[1], "PNG", "L"))
    (root / "sub" / "c_rgba.PNG").write_bytes(encode(pixels[2], "PNG", "RGBA"))
    (root / "sub" / "d.jpeg").write_bytes(encode(smooth_images(1, 32, 32)[0], "JPEG"))
    (root / "e_palette.gif").write_bytes(encode(pixels[4], "GIF"))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, ["predict", *args])


def rows(text: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames == COLUMNS
    return list(reader)


def expected_probabilities(run: Path, files: list[Path]) -> np.ndarray:
    """The .keras model on the images as training decodes them."""
    model = load_model(RunLayout(run).classifier)
    pixels = np.stack([decode_image(f.read_bytes(), TINY_MODEL_SIZE) for f in files]).astype(np.float32)
    return tf.nn.softmax(model(pixels)).numpy()


def test_predict_folder_skips_the_corrupt_file_and_predicts_the_rest(tiny_run, folder, caplog):
    with caplog.at_level(logging.WARNING):
        result = invoke("--model", str(tiny_run), str(folder))
    assert result.exit_code == 0, (result.output, result.exception)
    predicted = rows(result.stdout)
    good = ["a.jpg", "b_gray.png", "e_palette.gif", "sub/c_rgba.PNG", "sub/d.jpeg"]
    assert [row["path"] for row in predicted] == [f"{folder}/{name}" for name in good]
    probabilities = np.array([[float(row[f"prob_{n}"]) for n in CLASS_NAMES] for row in predicted])
    np.testing.assert_allclose(probabilities, expected_probabilities(tiny_run, [folder / n for n in good]), atol=ATOL)
    assert [row["class"] for row in predicted] == [CLASS_NAMES[k] for k in probabilities.argmax(1)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(folder / "broken.jpg") in w for w in warnings), warnings
    assert not any("notes.txt" in w for w in warnings)  # a folder's non-image files are not candidates


@pytest.mark.parametrize("form", ["savedmodel", "keras_file"])
def test_every_model_form_predicts_the_same(tiny_run, folder, form):
    layout = RunLayout(tiny_run)
    model = layout.classifier_savedmodel if form == "savedmodel" else layout.classifier
    reference, other = invoke("--model", str(tiny_run), str(folder)), invoke("--model", str(model), str(folder))
    assert other.exit_code == 0, (other.output, other.exception)
    first, second = rows(reference.stdout), rows(other.stdout)
    assert [(r["path"], r["class"]) for r in first] == [(r["path"], r["class"]) for r in second]
    for a, b in zip(first, second):
        for name in CLASS_NAMES:
            assert abs(float(a[f"prob_{name}"]) - float(b[f"prob_{name}"])) <= ATOL


def test_zip_and_single_files_to_an_output_file(tiny_run, folder, tmp_path):
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as target:
        for name in ("a.jpg", "sub/d.jpeg", "broken.jpg"):
            target.write(folder / name, f"pics/{name}")
    output = tmp_path / "out" / "predictions.csv"
    result = invoke("--model", str(tiny_run), "--output", str(output), "--batch-size", "2", str(archive),
                    str(folder / "b_gray.png"))
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout.strip() == f"Predictions: {output}"
    names = [row["path"] for row in rows(output.read_text())]
    assert names == [f"{archive}:pics/a.jpg", f"{archive}:pics/sub/d.jpeg", str(folder / "b_gray.png")]
    assert not list(output.parent.glob("*.partial"))


def test_help_marks_required_options_and_exit_codes():
    result = invoke("--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--model RUN_OR_MODEL" in text and "[required]" in text and "IMAGES..." in text
    assert "Exit codes: 0" in text and "2 a user error" in text
    assert "[default: 256" in text


def test_missing_model_is_a_user_error(tmp_path, folder):
    missing = tmp_path / "no-run"
    line = one_line_error(invoke("--model", str(missing), str(folder)))
    assert str(missing) in line


def test_run_without_classifier_is_a_user_error(tmp_path, folder):
    (tmp_path / "config.json").write_text("{}")
    line = one_line_error(invoke("--model", str(tmp_path), str(folder)))
    assert "classifier.keras" in line and "finetune" in line


def test_no_images_is_a_user_error(tiny_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    line = one_line_error(invoke("--model", str(tiny_run), str(empty)))
    assert "no images" in line and str(empty) in line


def test_only_unreadable_images_is_a_user_error(tiny_run, folder):
    line = one_line_error(invoke("--model", str(tiny_run), str(folder / "broken.jpg"), str(folder / "notes.txt")))
    assert "none of the 2 images" in line


def test_missing_image_path_is_a_user_error(tiny_run, tmp_path):
    line = one_line_error(invoke("--model", str(tiny_run), str(tmp_path / "nope.jpg")))
    assert "nope.jpg" in line


def test_large_image_is_resized(tiny_run, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(smooth_images(1, 600, 900)[0]).save(big)
    result = invoke("--model", str(tiny_run), str(big))
    assert result.exit_code == 0, (result.output, result.exception)
    (row,) = rows(result.stdout)
    np.testing.assert_allclose([float(row[f"prob_{n}"]) for n in CLASS_NAMES],
                               expected_probabilities(tiny_run, [big])[0], atol=ATOL)
