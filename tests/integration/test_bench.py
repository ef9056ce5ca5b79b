"""`python -m job bench` end to end on the small synthetic set: every documented figure, with sane values."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, SYNTH

BENCH_BATCHES = 2
LOG_EVERY = 2  # with runtime.steps_per_loop = 1, the looped measurement runs log_every_steps steps per call
RATES = ("seed_pipeline_samples_per_sec", "pipeline_samples_per_sec", "pipeline_images_per_sec",
         "train_samples_per_sec_synthetic", "train_samples_per_sec", "train_samples_per_sec_steps_per_loop_1",
         "train_samples_per_sec_steps_per_loop_n", "decode_images_per_sec")


@pytest.mark.parametrize("store", ["decoded", "encoded"])
def test_bench_reports_every_figure(tmp_path, synth_zip, store):
    """Both stores: each rate is positive, the speed-ups are the documented ratios, peak RSS only grows, the
    payload is the decoded images' bytes, and the looped figure ran log_every_steps steps per call."""
    overrides = {"data.cache_dir": tmp_path / "cache", "data.image_size": 32, "data.store": store,
                 "model.alpha": 0.35, "pretext.batch_images": 4, "runtime.log_every_steps": LOG_EVERY}
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    result = subprocess.run(
        [sys.executable, "-m", "job", "bench", "--data", str(synth_zip), "--batches", str(BENCH_BATCHES),
         "--repeats", "1", "--json", "--log-level", "warning", *sets],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)

    for key in RATES:
        assert figures[key] > 0, key
    assert figures["pipeline_images_per_sec"] == pytest.approx(figures["pipeline_samples_per_sec"] / 4)
    assert figures["pipeline_speedup"] == pytest.approx(
        figures["pipeline_samples_per_sec"] / figures["seed_pipeline_samples_per_sec"])
    assert figures["input_efficiency"] == pytest.approx(
        figures["train_samples_per_sec"] / figures["train_samples_per_sec_synthetic"])
    assert figures["loop_speedup"] == pytest.approx(
        figures["train_samples_per_sec_steps_per_loop_n"] / figures["train_samples_per_sec_steps_per_loop_1"])
    assert figures["steps_per_loop_n"] == LOG_EVERY
    assert 0 < figures["peak_rss_mb_after_decode"] <= figures["peak_rss_mb_after_pipelines"] <= figures["peak_rss_mb"]

    train_images = SYNTH["classes"] * SYNTH["per_class"]
    val_images = SYNTH["classes"] * SYNTH["val_per_class"]
    assert figures["train_images"] == train_images
    assert figures["payload_mb"] * 1024 * 1024 == pytest.approx((train_images + val_images) * 32 * 32 * 3)
    assert (figures["data_store"], figures["image_size"], figures["batch_images"]) == (store, 32, 4)
