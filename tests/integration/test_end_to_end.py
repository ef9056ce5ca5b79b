"""The whole job on a tiny synthetic dataset: every artifact and every metrics key."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from job.layout import RunLayout
from job.report import METRIC_KEYS, lookup
from job.synth import make_synthetic_dataset
from tests.jobproc import job_args, run_job
from tests.tbevents import events, steps

pytestmark = pytest.mark.slow

DEPTH_PROBE = ("evaluate.depth_probe=true", "evaluate.depth_probe_200=true",
               "evaluate.depth_probe_layers=['block_2_add', 'out_relu']", "finetune.transfer_layers=['auto']",
               "finetune.head_init='probe'", "evaluate.s4l=true", "finetune.s4l_images=4")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = root / "data.zip"
    make_synthetic_dataset(data, classes=4, per_class=16, downstream_per_class=24, val_per_class=6, image_size=32)
    output, cache = root / "run", root / "cache"
    result = run_job(job_args("run", data, output, cache, *DEPTH_PROBE))
    assert result.returncode == 0, result.stderr[-3000:]
    return data, output, cache, result


def test_every_artifact_is_written(finished_run):
    _, output, _, result = finished_run
    layout = RunLayout(output)
    for path in (layout.config, layout.backbone, layout.rotation_model, layout.classifier,
                 layout.classifier_savedmodel / "saved_model.pb", layout.rotation_savedmodel / "saved_model.pb",
                 RunLayout.done(layout.pretext), RunLayout.done(layout.evaluate), layout.metrics,
                 layout.report / "report.md"):
        assert path.is_file(), path
    for figure in ("curves.png", "confusion_matrix.png", "val_predictions.png", "pretext_rotations.png",
                   "label_efficiency.png"):
        assert (layout.report / figure).stat().st_size > 1000, figure
    assert list(layout.tensorboard("pretext").glob("events.out.tfevents.*"))
    assert list(layout.tensorboard("finetune").rglob("events.out.tfevents.*"))
    assert list((layout.pretext / "ckpt").glob("ckpt-*.index"))
    assert "Report:" in result.stdout


def test_every_metrics_key_is_present_and_sane(finished_run):
    _, output, _, _ = finished_run
    metrics = json.loads(RunLayout(output).metrics.read_text())
    for key in METRIC_KEYS:
        lookup(metrics, key)  # KeyError if missing
    for key in ("pretext.val_rotation_accuracy", "downstream.val_accuracy", "downstream.linear_probe_val_accuracy",
                "downstream.knn_val_accuracy", "baseline.scratch_val_accuracy"):
        assert 0.0 <= lookup(metrics, key) <= 1.0, key
    assert metrics["pretext"]["epochs"] == 2
    assert metrics["pretext"]["samples_per_sec"] > 0
    assert metrics["data"] == {**metrics["data"], "train_images": 2 * 24 + 2 * 16, "val_images": 24,
                               "skipped_images": 0}
    assert metrics["downstream"]["train_images"] == 48
    assert metrics["downstream"]["val_images"] == 12
    assert np.sum(metrics["downstream"]["confusion_matrix"]) == 12
    assert [row["fraction"] for row in metrics["label_efficiency"]] == [0.5, 1.0]
    assert all(len(row["colour_histogram"]) == 1 for row in metrics["label_efficiency"])  # one seed
    assert all(len(row["s4l"]) == 1 for row in metrics["label_efficiency"])  # evaluate.s4l: a row of its own
    assert 0.0 <= metrics["baseline"]["colour_histogram_val_accuracy"] <= 1.0
    depth = metrics["downstream"]["depth_probe"]
    assert [row["layer"] for row in depth] == ["block_2_add", "out_relu"]
    assert all(0.0 <= row[init] <= 1.0 for row in depth for init in ("pretrained", "random"))
    # The same probes cross-validated on the 48 train labels: each a whole number of the 48 right.
    cross_validated = metrics["downstream"]["depth_probe_cv"]
    assert [row["layer"] for row in cross_validated] == ["block_2_add", "out_relu"]
    scores = [row[init] for row in cross_validated for init in ("pretrained", "random")]
    downstream = metrics["downstream"]
    scores += [downstream["linear_probe_cv_accuracy"], downstream["random_linear_probe_cv_accuracy"]]
    assert all(0.0 <= score <= 1.0 and (48 * score) == pytest.approx(round(48 * score)) for score in scores)
    all_classes = metrics["pretext"]["linear_probe_200_by_depth"]  # 4 classes here
    assert [row["layer"] for row in all_classes] == ["block_2_add", "out_relu"]
    assert all(0.0 <= row[init] <= 1.0 for row in all_classes for init in ("pretrained", "random"))
    # ["auto"]: probed layers, alone or beside the shallowest, chosen by CV on the train labels and recorded.
    selection = metrics["downstream"]["transfer_selection"]
    assert set(selection) == {"block_2_add", "out_relu", "block_2_add+out_relu"}
    assert metrics["downstream"]["transfer_layers"] == max(selection, key=selection.get).split("+")
    # The transferred features' cross-validated probe uses the choice's folds: it reads the chosen score (to one
    # image: the two models pool the same layers through different graphs).
    chosen = "+".join(metrics["downstream"]["transfer_layers"])
    assert downstream["linear_probe_cv_accuracy"] == pytest.approx(selection[chosen], abs=1.01 / 48)
    assert metrics["downstream"]["head_init"] == "probe"
    assert 0.0 <= metrics["downstream"]["random_linear_probe_val_accuracy"] <= 1.0
    timing = metrics["timing"]
    assert timing["pretext_train_s"] > 0 and timing["downstream_s"] > 0 and timing["frozen_probes_s"] > 0
    assert timing["pretext_other_s"] > 0 and timing["report_s"] > 0
    assert timing["downstream_s"] == pytest.approx(
        timing["downstream_pretrained_s"] + timing["downstream_scratch_s"] + timing["downstream_s4l_s"])
    assert timing["downstream_s4l_s"] > 0  # evaluate.s4l
    assert set(timing["evaluations"]) == {"linear_probe", "knn", "depth_probe", "depth_probe_200", "colour_baseline",
                                          "scratch_baseline", "label_efficiency", "s4l"}
    assert timing["total_s"] > timing["pretext_train_s"] + timing["downstream_s"]
    assert timing["outside_pretext_fraction"] == pytest.approx(1 - timing["pretext_train_s"] / timing["total_s"])
    report = (RunLayout(output).report / "report.md").read_text()
    assert f"{metrics['pretext']['val_rotation_accuracy']:.4f}" in report
    assert "| out_relu |" in report
    assert "S4L (pretrained)" in report
    assert report.index("## Verdict") < report.index("## Details")


def test_metrics_json_keeps_every_key_main_wrote_for_the_demo_config(finished_run):
    """Every key of main's demo-config metrics.json (before the evaluations were plug-ins) is in a run's, and
    only the documented timing keys are new; this run adds rows that the demo's switches leave off."""
    from tests.unit.test_report import MAIN_DEMO, NEW_KEYS, metric_paths

    _, output, _, _ = finished_run
    main = metric_paths(json.loads((MAIN_DEMO / "metrics.json").read_text()))
    paths = metric_paths(json.loads(RunLayout(output).metrics.read_text()))
    assert main <= paths
    by_depth = {f"{key}[].{field}" for key in ("downstream.depth_probe", "downstream.depth_probe_cv",
                                                "pretext.linear_probe_200_by_depth")
                for field in ("layer", "pretrained", "random")}
    assert paths - main == NEW_KEYS | {"label_efficiency[].s4l"} | by_depth


def test_exported_models_load_and_predict(finished_run):
    from models.backbone import load_model

    _, output, _, _ = finished_run
    layout = RunLayout(output)
    images = np.zeros((2, 32, 32, 3), np.float32)
    assert load_model(layout.classifier)(images).shape == (2, 2)
    assert load_model(layout.rotation_model)(images).shape == (2, 4)
    assert load_model(layout.backbone)(images).shape[0] == 2


def test_servable_exports_serve_encoded_images(finished_run, tmp_path):
    """The SavedModels beside the .keras files, loaded with TensorFlow alone, agree with them on JPEG bytes."""
    import tensorflow as tf

    from job.data import decode_image
    from job.serving import ANGLE, INPUT_NAME, PROBABILITIES, SERVING_SIGNATURE
    from models.backbone import load_model
    from tests.unit.test_serving import encode, serve_in_fresh_process, smooth_images

    _, output, _, _ = finished_run
    layout = RunLayout(output)
    encoded = [encode(image, "JPEG") for image in smooth_images(3, 32, 32)]
    pixels = np.stack([decode_image(b, 32) for b in encoded]).astype(np.float32)
    served = serve_in_fresh_process(layout.classifier_savedmodel, encoded, tmp_path)
    expected = tf.nn.softmax(load_model(layout.classifier)(pixels)).numpy()
    np.testing.assert_allclose(served["probabilities"], expected, atol=1e-5)
    assert served["class_name"] == [["fish", "duck"][k] for k in expected.argmax(1)]
    rotation = tf.saved_model.load(str(layout.rotation_savedmodel)).signatures[SERVING_SIGNATURE]
    outputs = rotation(**{INPUT_NAME: tf.constant(encoded)})
    assert outputs[PROBABILITIES].shape == (3, 4)
    assert set(outputs[ANGLE].numpy().tolist()) <= {0, 90, 180, 270}


def test_tensorboard_logs(finished_run):
    """Before: no validation loss, rotation images at epochs 1, 2 beside scalars at global steps 5, 10, the
    predicted angles only in the first image event's description, and no run summary (hparams, text)."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata as hparams_metadata

    _, output, _, _ = finished_run
    layout = RunLayout(output)
    metrics = json.loads(layout.metrics.read_text())
    pretext = events(layout.tensorboard("pretext"))
    assert len(pretext) == len(set(pretext))  # no step twice
    done = json.loads(RunLayout.done(layout.pretext).read_text())
    epoch_ends = [done["steps"] // done["epochs"] * (e + 1) for e in range(done["epochs"])]
    assert epoch_ends == [5, 10]  # 80 train images, 16 a batch
    for tag in ("val/rotation_accuracy", "val/loss", "val/rotations", "val/rotation_predictions"):
        assert steps(pretext, tag) == epoch_ends, tag  # one step axis: the global step
    assert steps(pretext, "train/loss")[-1] == epoch_ends[-1]
    assert all(h["loss"] > 0 for h in metrics["pretext"]["history"])  # val loss beside val accuracy
    for run in layout.tensorboard("finetune").iterdir():
        logged = events(run)
        assert steps(logged, "val/loss") == steps(logged, "val/accuracy") != [], run.name

    summary = EventAccumulator(str(layout.summary_logs))
    summary.Reload()
    assert hparams_metadata.SESSION_START_INFO_TAG in summary.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    assert set(summary.PluginTagToContent("text")) == {"config", "data", "verdict"}
    (rotation,) = summary.Tensors("final/rotation_accuracy")
    assert float(tf.make_ndarray(rotation.tensor_proto)) == pytest.approx(metrics["pretext"]["val_rotation_accuracy"])
    assert {f"final/labels_{f:g}/pretrained" for f in (0.5, 1.0)} <= set(summary.PluginTagToContent("scalars"))


def test_rerun_skips_complete_stages(finished_run):
    data, output, cache, _ = finished_run
    before = RunLayout(output).metrics.read_text()
    result = run_job(job_args("run", data, output, cache, *DEPTH_PROBE))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pretrain: complete" in result.stderr
    assert "epoch 1/" not in result.stderr  # nothing trained again
    assert json.loads(RunLayout(output).metrics.read_text()) == json.loads(before)


def test_a_vertex_tuning_trial_takes_its_hyperparameters_and_reports_its_metrics(finished_run, tmp_path):
    """As Vertex AI runs a trial: its value as an extra `--SECTION.KEY=VALUE` argument, the metrics read back from
    $CLOUD_ML_HP_METRIC_FILE (cloudml-hypertune's JSON lines), equal to metrics.json's."""
    data, output, cache, _ = finished_run
    metric_file = tmp_path / "hypertune" / "output.metrics"
    args = [*job_args("run", data, output, cache, *DEPTH_PROBE), "--runtime.log_every_steps=7"]
    result = run_job(args, CLOUD_ML_TRIAL_ID="5", CLOUD_ML_HP_METRIC_FILE=str(metric_file))
    assert result.returncode == 0, result.stderr[-3000:]
    layout = RunLayout(output)
    assert json.loads(layout.config.read_text())["runtime"]["log_every_steps"] == 7
    metrics = json.loads(layout.metrics.read_text())
    reported = {}
    for line in metric_file.read_text().splitlines():
        record = json.loads(line)
        assert record["trial"] == "5"
        reported.update({k: v for k, v in record.items() if k not in ("trial", "timestamp", "global_step")})
    assert reported["downstream.val_accuracy"] == str(float(metrics["downstream"]["val_accuracy"]))
    assert reported["pretext.val_rotation_accuracy"] == str(float(metrics["pretext"]["val_rotation_accuracy"]))


def test_force_trains_a_complete_stage_again(finished_run, tmp_path):
    """`finetune --force` on a finished run (a copy of it) trains its downstream run again: new timings, new
    TensorBoard events (the old ones discarded with the stage), a new classifier; not a done.json rewritten from
    the old checkpoint. (Without --force the rerun above skips it.)"""
    data, finished, cache, _ = finished_run
    output = tmp_path / "run"
    shutil.copytree(finished, output)  # keeps mtimes
    layout = RunLayout(output)
    stage = layout.downstream("pretrained", "finetune", 1.0, 0)
    before = json.loads(RunLayout.done(stage).read_text())
    events = layout.logs_of(stage)
    events_before = {p.name for p in events.glob("events.out.tfevents.*")}
    classifier_before = layout.classifier.stat().st_mtime_ns

    result = run_job([*job_args("finetune", data, output, cache, *DEPTH_PROBE), "--force"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"--force: discarding {stage}" in result.stderr
    assert "Resumed from" not in result.stderr and "epoch 1/1" in result.stderr
    after = json.loads(RunLayout.done(stage).read_text())
    assert after["fingerprint"] == before["fingerprint"]  # the same settings and data
    assert after["train_seconds"] != before["train_seconds"]
    assert [h["epoch_seconds"] for h in after["history"]] != [h["epoch_seconds"] for h in before["history"]]
    events_after = {p.name for p in events.glob("events.out.tfevents.*")}
    assert events_before and events_after and not events_before & events_after
    assert layout.classifier.stat().st_mtime_ns > classifier_before
