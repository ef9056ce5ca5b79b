"""Tests for job.report: metrics.json assembly and the report's verdict table (no TensorFlow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from job import evaluations as registry
from job.report import (
    METRIC_KEYS,
    Examples,
    _markdown,
    _plot_curves,
    add_report_time,
    build_metrics,
    frozen_feature_rows,
    lookup,
    write_report,
)

# A `make demo`-config run of main before the evaluations became plug-ins (runtime.deterministic): its pretext
# and evaluate done.json and its metrics.json (fingerprints left out).
MAIN_DEMO = Path(__file__).resolve().parents[1] / "data" / "main_demo"
OPAQUE = ("downstream.transfer_selection", "timing.evaluations")  # their keys are names (layers, evaluations)
NEW_TIMING = {f"timing.{key}" for key in (
    "pretext_other_s", "downstream_pretrained_s", "downstream_scratch_s", "downstream_s4l_s", "evaluate_setup_s",
    "evaluations", "report_s", "total_s", "outside_pretext_fraction")}
# keys added since, each documented in the README
NEW_KEYS = NEW_TIMING | {"pretext.linear_probe_200_by_depth", "pretext.val_colour_order_accuracy",
                         "downstream.linear_probe_cv_accuracy", "downstream.random_linear_probe_cv_accuracy",
                         "downstream.depth_probe_cv"}


def metric_paths(value, prefix: str = "") -> set[str]:
    """Every dotted key of a metrics.json object; a list's dict rows as `key[].field`."""
    paths: set[str] = set()
    rows = value if isinstance(value, list) else [value]
    for row in rows:
        if not isinstance(row, dict) or prefix.rstrip(".") in OPAQUE:
            continue
        for key, item in row.items():
            path = f"{prefix}{key}"
            paths.add(path)
            paths |= metric_paths(item, f"{path}[]." if isinstance(item, list) else f"{path}.")
    return paths


def _run(seed: int, accuracy: float) -> dict:
    return {"mode": "finetune", "label_fraction": 1.0, "val_accuracy": accuracy, "best_epoch_val_accuracy": accuracy,
            "confusion_matrix": [[1, 0], [0, 1]], "train_images": 10, "val_images": 2, "seed": seed,
            "history": [], "transfer_layers": ["block_12_add"], "head_init": "probe"}


@pytest.fixture
def metrics() -> dict:
    pretext = {"val_rotation_accuracy": 0.6, "epochs": 3, "train_seconds": 10.0, "samples_per_sec": 5.0,
               "train_images": 100, "history": []}
    evaluations = {
        "transfer_layers": ["block_12_add"], "linear_probe_val_accuracy": 0.9, "random_linear_probe_val_accuracy": 0.7,
        "knn_val_accuracy": 0.8, "linear_probe_200_top1": 0.06, "random_linear_probe_200_top1": 0.02,
        "depth_probe": [{"layer": "block_2_add", "pretrained": 0.8, "random": 0.85},
                        {"layer": "block_12_add", "pretrained": 0.9, "random": 0.75}],
        "linear_probe_200_by_depth": [{"layer": "block_2_add", "pretrained": 0.04, "random": 0.05},
                                      {"layer": "block_12_add", "pretrained": 0.08, "random": 0.03}],
        "finetune": [_run(0, 0.9), _run(1, 1.0)], "scratch": [_run(0, 0.7), _run(1, 0.8)],
        "colour_histogram": [0.8, 0.8],
        "label_efficiency": [
            {"fraction": 0.1, "pretrained": [0.8, 0.9], "scratch": [0.6, 0.6], "colour_histogram": [0.9, 0.9]},
            {"fraction": 1.0, "pretrained": [0.9, 1.0], "scratch": [0.7, 0.8], "colour_histogram": [0.8, 0.8]},
        ],
    }
    data = {"train_images": 100, "val_images": 20, "skipped_images": 0, "skipped_files": []}
    return build_metrics(pretext, evaluations, data, registry.metrics(evaluations))


def test_every_documented_key_is_assembled(metrics):
    for key in METRIC_KEYS:
        lookup(metrics, key)
    assert metrics["downstream"]["transfer_layers"] == ["block_12_add"]
    assert metrics["downstream"]["head_init"] == "probe"
    assert metrics["pretext"]["random_linear_probe_200_top1"] == 0.02


def test_the_report_opens_with_the_verdict(metrics):
    text = _markdown(metrics, [])
    lines = text.splitlines()
    verdict = lines.index("## Verdict")
    assert verdict < lines.index("## Details")
    # Δ in points against scratch and colour, per label fraction.
    assert "| 10% | 2 | 0.8500 ± 0.0500 | 0.6000 ± 0.0000 | 0.9000 ± 0.0000 | +25.0 | -5.0 |" in lines
    assert "| 100% | 2 | 0.9500 ± 0.0500 | 0.7500 ± 0.0500 | 0.8000 ± 0.0000 | +20.0 | +15.0 |" in lines
    # One run is one backbone: the verdict says how to judge several.
    assert any("python -m job compare RUN..." in line for line in lines[verdict:lines.index("## Details")])
    # Frozen features against random ones: the same features, and the random network's best depth.
    assert "| fish/duck on the transferred features (block_12_add) | 0.9000 | 0.7000 | +20.0 |" in lines
    # The all-class rows add the ratio (the goal is 2x a random network's).
    assert "| all-class (200-way) on the transferred features | 0.0600 | 0.0200 | +4.0 (3.00×) |" in lines
    assert "| fish/duck: transferred features vs random's best depth (block_2_add) | 0.9000 | 0.8500 | +5.0 |" in lines
    # The all-class probe's best depth of each network: pretrained 0.08 (block_12_add) against random 0.05.
    assert ("| all-class (200-way): best depth of each (block_12_add vs block_2_add) | 0.0800 | 0.0500 | "
            "+3.0 (1.60×) |") in lines
    by_depth = lines.index("## All-class linear probe by depth (val top-1, frozen pooled features)")
    assert lines[by_depth + 4:by_depth + 6] == ["| block_2_add | 0.0400 | 0.0500 |",
                                                "| block_12_add | 0.0800 | 0.0300 |"]


def test_the_random_networks_depth_is_also_picked_on_the_train_labels(metrics):
    """The best depth on val (0.85 at block_2_add) is picked on the images it is scored on; cross-validation on the
    train labels picks block_12_add for the random network, whose val probe reads 0.75 there."""
    metrics["downstream"].update(
        linear_probe_cv_accuracy=0.88, random_linear_probe_cv_accuracy=0.7,
        depth_probe_cv=[{"layer": "block_2_add", "pretrained": 0.81, "random": 0.78},
                        {"layer": "block_12_add", "pretrained": 0.88, "random": 0.8}])
    lines = _markdown(metrics, []).splitlines()
    assert "| fish/duck: transferred features vs random's best depth (block_2_add) | 0.9000 | 0.8500 | +5.0 |" in lines
    assert ("| fish/duck: transferred features vs random at the depth its train-label cross-validation picks "
            "(block_12_add) | 0.9000 | 0.7500 | +15.0 |") in lines
    assert ("| fish/duck, cross-validated on the 10 train labels instead of val: transferred features vs random's "
            "best depth (block_12_add) | 0.8800 | 0.8000 | +8.0 |") in lines
    by_depth = lines.index("## Linear probe by depth (downstream val accuracy, all labels, frozen pooled features)")
    assert lines[by_depth + 2:by_depth + 6] == [
        "| layer | pretrained | random init | pretrained, train-label CV | random init, train-label CV |",
        "|---|---|---|---|---|",
        "| block_2_add | 0.8000 | 0.8500 | 0.8100 | 0.7800 |",
        "| block_12_add | 0.9000 | 0.7500 | 0.8800 | 0.8000 |"]
    keys = [row.key for row in frozen_feature_rows(metrics)]
    assert keys == ["fish_duck", "all_class", "fish_duck_vs_random_best", "fish_duck_vs_random_cv_depth",
                    "fish_duck_cv_vs_random_best_cv", "all_class_best_depths"]


def test_the_transfer_layers_are_named_with_how_they_were_chosen(metrics):
    row = "| Transfer layers (the backbone cut after the deepest) | {} |"
    assert row.format("block_12_add") in _markdown(metrics, []).splitlines()  # configured, not chosen
    metrics["downstream"]["transfer_selection"] = {"block_2_add": 0.88, "block_12_add": 0.87}
    assert row.format("block_12_add, chosen by cross-validation on the train labels (0.870; the best: block_2_add, "
                      "0.880)") in _markdown(metrics, []).splitlines()
    metrics["downstream"]["transfer_layers"] = ["block_2_add"]
    assert row.format("block_2_add, chosen by cross-validation on the train labels (0.880; the best)") in \
        _markdown(metrics, []).splitlines()


def test_switched_off_evaluations_read_not_available(metrics):
    metrics["pretext"]["linear_probe_200_top1"] = None
    metrics["downstream"]["depth_probe"] = None
    metrics["pretext"]["linear_probe_200_by_depth"] = None
    text = _markdown(metrics, [])
    assert "| all-class (200-way) on the transferred features | n/a | 0.0200 | n/a |" in text
    assert "random's best depth" not in text and "best depth of each" not in text and "by depth" not in text


def test_without_any_probe_the_verdict_says_so_instead_of_a_table(metrics):
    for key in ("linear_probe_val_accuracy", "random_linear_probe_val_accuracy", "depth_probe"):
        metrics["downstream"][key] = None
    for key in ("linear_probe_200_top1", "random_linear_probe_200_top1", "linear_probe_200_by_depth"):
        metrics["pretext"][key] = None
    text = _markdown(metrics, [])
    assert "No frozen-feature probes ran in this evaluation" in text and "| probe | pretrained |" not in text
    assert "| 10% | 2 |" in text  # the label-efficiency rows stay


def test_s4l_is_a_row_of_its_own_beside_the_transfer_numbers(metrics):
    assert "S4L" not in _markdown(metrics, [])
    for row, joint in zip(metrics["label_efficiency"], ([0.7, 0.8], [1.0, 1.0]), strict=True):
        row["s4l"] = joint
    lines = _markdown(metrics, []).splitlines()
    # The transfer columns are unchanged; S4L and its Δ against scratch follow.
    assert ("| 10% | 2 | 0.8500 ± 0.0500 | 0.6000 ± 0.0000 | 0.9000 ± 0.0000 | +25.0 | -5.0 | 0.7500 ± 0.0500 "
            "| +15.0 |") in lines
    assert ("| 100% | 2 | 0.9500 ± 0.0500 | 0.7500 ± 0.0500 | 0.8000 ± 0.0000 | +20.0 | +15.0 | 1.0000 ± 0.0000 "
            "| +25.0 |") in lines


def test_counts_and_label_shares_read_as_words(metrics):
    """One seed is '1 seed' and a label fraction of 1 is '100% of the labels' (it read '1 of labels', '1 seeds')."""
    metrics["downstream"]["seeds"] = [0]
    text = _markdown(metrics, [])
    assert "finetune, 100% of the labels (mean ± std, 1 seed)" in text
    assert "over 1 seed of the downstream stage" in text
    assert "1 seeds" not in text and "of labels" not in text and "seed(s)" not in text


def test_knn_k_is_the_configured_one_with_a_note_when_capped(metrics):
    """The report's k is the k used (it always read 'k = 20'), with a note when evaluate.knn_k was capped."""
    metrics["downstream"].update(knn_k=5, knn_k_configured=5)
    assert "| k-NN (cosine, k = 5) on frozen features, val accuracy | 0.8000 |" in _markdown(metrics, [])
    metrics["downstream"].update(knn_k=9, knn_k_configured=20)
    assert ("| k-NN (cosine, k = 9; evaluate.knn_k = 20, capped below the number of train images) on frozen "
            "features, val accuracy | 0.8000 |") in _markdown(metrics, [])


def _examples() -> Examples:
    """Four rotated and two val images, blank, with their labels and predictions: what the report's grids draw."""
    return Examples(
        rotated_images=np.zeros((4, 8, 8, 3), np.uint8), rotation_true=np.array([0, 90, 180, 270]),
        rotation_predicted=np.array([0, 90, 0, 270]), val_images=np.zeros((2, 8, 8, 3), np.uint8),
        val_true=np.array([0, 1]), val_predicted=np.array([0, 0]), class_names=["fish", "duck"], count=2,
    )


def _evaluations_switched_off() -> dict:
    """What the evaluate stage returned (before the evaluations were plug-ins) with evaluate.linear_probe_200,
    depth_probe, scratch_baseline and colour_baseline off: None, an empty list or no colour scores."""
    return {
        "transfer_layers": ["out_relu"], "transfer_selection": None, "linear_probe_val_accuracy": 0.9,
        "random_linear_probe_val_accuracy": 0.7, "knn_val_accuracy": 0.8, "knn_k": 20, "knn_k_configured": 20,
        "linear_probe_200_top1": None, "random_linear_probe_200_top1": None, "depth_probe": None,
        "finetune": [_run(0, 0.9)], "scratch": [], "colour_histogram": [],
        "label_efficiency": [{"fraction": 1.0, "pretrained": [0.9], "scratch": [], "colour_histogram": []}],
        "timing": {"frozen_probes_s": 1.0, "colour_baseline_s": 0.0, "downstream_s": 2.0},
    }


def test_switched_off_evaluations_keep_every_key_and_the_report_renders(tmp_path):
    pretext = {"val_rotation_accuracy": 0.6, "online_probe_val_accuracy": None, "epochs": 1, "train_seconds": 1.0,
               "samples_per_sec": 5.0, "train_images": 10, "history": []}
    data = {"train_images": 10, "val_images": 2, "skipped_images": 0, "skipped_files": []}
    done = _evaluations_switched_off()
    metrics = build_metrics(pretext, done, data, registry.metrics(done))
    for key in METRIC_KEYS:
        lookup(metrics, key)
    off = ("pretext.linear_probe_200_top1", "pretext.random_linear_probe_200_top1", "pretext.linear_probe_200_by_depth",
           "downstream.depth_probe",
           "downstream.transfer_selection", "baseline.scratch_val_accuracy", "baseline.scratch_val_accuracy_std",
           "baseline.colour_histogram_val_accuracy", "baseline.colour_histogram_val_accuracy_std")
    assert {key: lookup(metrics, key) for key in off} == dict.fromkeys(off)
    assert metrics["label_efficiency"][0]["scratch"] == metrics["label_efficiency"][0]["colour_histogram"] == []

    examples = _examples()
    path = write_report(tmp_path, metrics, examples)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    text = path.read_text()
    lines = text.splitlines()
    assert "| Scratch baseline, same recipe (mean ± std, 1 seed) | n/a |" in lines
    assert "| 100% | 1 | 0.9000 ± 0.0000 | n/a | n/a | n/a | n/a |" in lines  # no scratch nor colour scores
    assert "all-class (200-way) on the transferred features" not in text  # neither probe ran: no row of n/a
    assert "Linear probe by depth" not in text and "random's best depth" not in text
    assert (tmp_path / "label_efficiency.png").stat().st_size > 0


def test_a_report_of_the_depth_probe_alone_says_what_did_not_run(tmp_path):
    """evaluate.evaluations = ["depth_probe"]: the verdict says no fine-tunes ran instead of a table of n/a rows,
    keeps the frozen-feature rows with a value, and the report draws no empty label-efficiency figure (matplotlib
    warned of a legend without entries)."""
    import warnings

    history = [{"epoch": 1, "train_loss": 1.0, "loss": 1.1}]
    pretext = {"val_rotation_accuracy": 0.6, "epochs": 1, "train_seconds": 1.0, "samples_per_sec": 5.0,
               "train_images": 10, "history": history}
    data = {"train_images": 10, "val_images": 2, "skipped_images": 0, "skipped_files": []}
    done = {"transfer_layers": ["block_12_add"], "finetune": [{**_run(0, 0.9), "history": history}],
            "depth_probe": [{"layer": "block_2_add", "pretrained": 0.8, "random": 0.85},
                            {"layer": "block_12_add", "pretrained": 0.9, "random": 0.75}],
            "label_efficiency": [{"fraction": f, "pretrained": [], "scratch": [], "colour_histogram": []}
                                 for f in (0.02, 1.0)]}
    metrics = build_metrics(pretext, done, data, registry.metrics(done))
    examples = _examples()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = write_report(tmp_path, metrics, examples).read_text()
    verdict = text[text.index("## Verdict"):text.index("## Details")]
    assert "No fish vs duck fine-tunes or baselines ran in this evaluation" in verdict
    assert "| labels |" not in verdict and "| 2% |" not in verdict
    assert "| fish/duck: transferred features vs random's best depth (block_2_add) | n/a | 0.8500 | n/a |" in verdict
    assert "on the transferred features (block_12_add)" not in verdict  # the probe of its own did not run
    assert "label_efficiency.png" not in text and not (tmp_path / "label_efficiency.png").exists()
    assert "| block_12_add | 0.9000 | 0.7500 |" in text


def test_mains_demo_results_give_its_metrics_json_with_timing_added():
    """The done.json files main wrote, read by the evaluations' own mappings: every metrics.json key and value
    main wrote, and only the documented new keys besides (a run's key set: tests/integration)."""
    old = json.loads((MAIN_DEMO / "metrics.json").read_text())
    pretext = json.loads((MAIN_DEMO / "pretext_done.json").read_text())
    done = json.loads((MAIN_DEMO / "evaluate_done.json").read_text())
    data = {**old["data"], "decode_seconds": old["timing"]["decode_s"]}
    metrics = build_metrics(pretext, done, data, registry.metrics(done))
    assert metric_paths(metrics) == metric_paths(old) | NEW_KEYS
    for section, values in old.items():
        expected = values if not isinstance(values, dict) else {**metrics[section], **values}
        assert metrics[section] == expected, section


def test_timing_totals_the_parts_and_the_share_outside_pretext_training(metrics):
    metrics["timing"].update(decode_s=None, pretext_train_s=60.0, pretext_other_s=10.0, downstream_s=20.0,
                             evaluate_setup_s=2.0, evaluations={"linear_probe": 3.0, "knn": 1.0})
    add_report_time(metrics, 4.0)
    assert metrics["timing"]["report_s"] == 4.0
    assert metrics["timing"]["total_s"] == pytest.approx(100.0)
    assert metrics["timing"]["outside_pretext_fraction"] == pytest.approx(0.4)


def test_the_pretext_curves_plot_val_only_at_the_evaluated_epochs(metrics):
    """With pretext.eval_every_epochs = 2 the first epoch's record has no val metrics: the val curve is drawn at
    epochs 2 and 3, the train curve at all three (before, a val key missing from the first record hid it)."""
    metrics["pretext"]["history"] = [
        {"epoch": 1, "train_rotation_accuracy": 0.3},
        {"epoch": 2, "train_rotation_accuracy": 0.4, "rotation_accuracy": 0.45},
        {"epoch": 3, "train_rotation_accuracy": 0.5, "rotation_accuracy": 0.55},
    ]
    metrics["downstream"]["history"] = []
    figure = _plot_curves(metrics)
    lines = {line.get_label(): list(line.get_xdata()) for line in figure.axes[0].get_lines()}
    assert lines == {"train_rotation_accuracy": [1, 2, 3], "val_rotation_accuracy": [2, 3]}
