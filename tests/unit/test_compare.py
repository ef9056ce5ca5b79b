"""Tests for `job compare` (job/compare.py): replicates side by side, the mean ± std over runs (no TensorFlow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from job import evaluations as registry
from job.cli import main
from job.compare import comparison_markdown, load_run, recipes_markdown
from job.files import write_json
from job.layout import RunLayout
from job.report import build_metrics
from tests.unit.test_cli_errors import one_line_error


def _finetune(seed: int) -> dict:
    return {"mode": "finetune", "label_fraction": 1.0, "val_accuracy": 0.9, "best_epoch_val_accuracy": 0.9,
            "confusion_matrix": [[1, 0], [0, 1]], "train_images": 10, "val_images": 2, "seed": seed,
            "history": [], "transfer_layers": ["block_12_add"], "head_init": "probe"}


def metrics(rotation: float, few: list[float], probe: float, random_best: float, total_s: float) -> dict:
    """A run's metrics.json: `few` the pretrained accuracies at 2% over its label subsets (scratch 0.7, 0.8)."""
    pretext = {"val_rotation_accuracy": rotation, "epochs": 3, "train_seconds": 10.0, "samples_per_sec": 5.0,
               "train_images": 100, "history": []}
    evaluations = {
        "transfer_layers": ["block_12_add"], "linear_probe_val_accuracy": probe,
        "random_linear_probe_val_accuracy": 0.7, "knn_val_accuracy": 0.8, "linear_probe_200_top1": 0.08,
        "random_linear_probe_200_top1": 0.04,
        "depth_probe": [{"layer": "block_2_add", "pretrained": 0.8, "random": random_best},
                        {"layer": "block_12_add", "pretrained": probe, "random": 0.7}],
        "finetune": [_finetune(0)], "scratch": [_finetune(0)], "colour_histogram": [0.8],
        "label_efficiency": [{"fraction": 0.02, "pretrained": few, "scratch": [0.7, 0.8],
                              "colour_histogram": [0.75, 0.75]}],
        "timing": {"total_s": total_s},
    }
    data = {"train_images": 100, "val_images": 20, "skipped_images": 0, "skipped_files": []}
    built = build_metrics(pretext, evaluations, data, registry.metrics(evaluations))
    built["timing"]["total_s"] = total_s
    return built


def write_run(root: Path, run_metrics: dict, seed: int, epochs: int = 44) -> Path:
    layout = RunLayout(root)
    write_json(layout.metrics, run_metrics)
    write_json(layout.config, {"pretext": {"epochs": epochs}, "runtime": {"seed": seed}})
    write_json(layout.run_record, {"data": {"uri": "mini.zip", "version": "1"}, "commands": ["evaluate"]})
    return root


@pytest.fixture
def replicates(tmp_path) -> list[Path]:
    return [write_run(tmp_path / "seed0", metrics(0.52, [0.9, 0.8], 0.96, 0.89, 2_600), seed=0),
            write_run(tmp_path / "seed1", metrics(0.54, [0.8, 0.8], 0.88, 0.90, 2_800), seed=1)]


def table(text: str) -> dict[str, list[str]]:
    """The comparison's rows by measure: the runs' cells, then the mean's."""
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows[1:]}


def test_the_train_label_cross_validated_rows_read_n_a_for_runs_from_before_them(tmp_path, replicates):
    """A run with the probes cross-validated on the train labels beside one from before them: its rows, the
    older run's cells n/a and the mean over the one run that has them."""
    newer = metrics(0.52, [0.9, 0.8], 0.96, 0.89, 2_600)
    newer["downstream"].update(
        linear_probe_cv_accuracy=0.95, random_linear_probe_cv_accuracy=0.7,
        depth_probe_cv=[{"layer": "block_2_add", "pretrained": 0.8, "random": 0.9},
                        {"layer": "block_12_add", "pretrained": 0.95, "random": 0.93}])
    runs = [load_run(str(write_run(tmp_path / "newer", newer, seed=2)), Path()),
            load_run(str(replicates[0]), Path())]
    rows = table(comparison_markdown(runs))
    # The random network's train-label CV picks block_12_add (0.93), whose val probe reads 0.7: 0.96 - 0.7.
    assert rows["fish/duck: Δ a random network at the depth its train-label CV picks"] == ["+26.0", "n/a",
                                                                                          "+26.0 (1 of 2)"]
    assert rows["fish/duck probe, cross-validated on the train labels"] == ["0.950", "n/a", "0.950 (1 of 2)"]
    assert rows["fish/duck, train-label CV: Δ a random network's best depth"] == ["+2.0", "n/a", "+2.0 (1 of 2)"]
    assert rows["fish/duck: Δ a random network's best depth"] == ["+7.0", "+7.0", "+7.0 ± 0.0"]


def test_each_run_has_its_column_and_the_last_is_the_mean_over_runs(replicates):
    text = comparison_markdown([load_run(str(path), Path()) for path in replicates])
    rows = table(text)
    assert "| measure | seed0 (seed 0) | seed1 (seed 1) | mean ± std |" in text
    assert rows["val rotation accuracy"] == ["0.520", "0.540", "0.530 ± 0.010"]
    # Each run's 2% row is the mean over its label subsets (0.85 and 0.80); Δ against scratch's 0.75, in points.
    assert rows["2% labels: pretrained"] == ["0.850", "0.800", "0.825 ± 0.025"]
    assert rows["2% labels: Δ scratch"] == ["+10.0", "+5.0", "+7.5 ± 2.5"]
    assert rows["2% labels: Δ colour"] == ["+10.0", "+5.0", "+7.5 ± 2.5"]
    # The frozen features against a random network's best depth, whichever layer that is in each run.
    assert rows["fish/duck: Δ a random network's best depth"] == ["+7.0", "-2.0", "+2.5 ± 4.5"]
    assert rows["all-class: × the same layers at random init"] == ["2.00×", "2.00×", "2.00× ± 0.00"]
    assert rows["wall time (minutes)"] == ["43.3", "46.7", "45.0 ± 1.7"]
    assert "differ in more than" not in text
    assert text.startswith("# 2 runs side by side")
    assert comparison_markdown([load_run(str(replicates[0]), Path())]).startswith("# 1 run side by side")


def test_runs_of_different_recipes_are_named_under_the_table(tmp_path, replicates):
    other = write_run(tmp_path / "forty", metrics(0.50, [0.7, 0.7], 0.9, 0.9, 2_400), seed=0, epochs=40)
    text = comparison_markdown([load_run(str(path), Path()) for path in [*replicates, other]])
    assert "These runs differ in more than `runtime.seed`, so the mean mixes recipes:" in text
    assert "- pretext.epochs: 44 / 44 / 40" in text


def test_a_setting_added_since_an_older_run_differs_only_off_its_default(tmp_path, replicates):
    """A run from before pretext.weight_decay_exempt existed lacks the key: beside runs at its default ([], what
    the older code did) nothing differs; beside a run that sets it, the older runs read "not recorded"."""
    def newer(name: str, exempt: list[str]) -> Path:
        path = write_run(tmp_path / name, metrics(0.52, [0.9, 0.8], 0.96, 0.89, 2_600), seed=2)
        write_json(RunLayout(path).config, {"pretext": {"epochs": 44, "weight_decay_exempt": exempt},
                                            "runtime": {"seed": 2}})
        return path

    at_default = comparison_markdown([load_run(str(p), Path()) for p in [*replicates, newer("plain", [])]])
    assert "differ in more than" not in at_default
    exempt = comparison_markdown([load_run(str(p), Path()) for p in [*replicates, newer("exempt", ["gamma"])]])
    assert '- pretext.weight_decay_exempt: not recorded / not recorded / ["gamma"]' in exempt


def test_a_measure_one_run_lacks_is_averaged_over_the_others(tmp_path, replicates):
    no_probe = metrics(0.5, [0.8, 0.8], 0.9, 0.9, 2_000)
    no_probe["downstream"]["knn_val_accuracy"] = None
    text = comparison_markdown([load_run(str(path), Path()) for path in
                                [*replicates, write_run(tmp_path / "noknn", no_probe, seed=2)]])
    assert table(text)["k-NN (fish/duck)"] == ["0.800", "0.800", "n/a", "0.800 ± 0.000 (2 of 3)"]


def test_the_command_prints_the_table_or_writes_it(replicates, tmp_path):
    printed = CliRunner().invoke(main, ["compare", *map(str, replicates)])
    assert printed.exit_code == 0, printed.output
    assert table(printed.stdout)["val rotation accuracy"][-1] == "0.530 ± 0.010"
    out = tmp_path / "out" / "replicates.md"
    written = CliRunner().invoke(main, ["compare", *map(str, replicates), "--output", str(out)])
    assert written.exit_code == 0, written.output
    assert out.read_text() == printed.stdout
    assert written.stdout == f"Comparison: {out}\n"


def test_a_run_without_a_report_is_one_line_naming_it(replicates, tmp_path):
    unfinished = tmp_path / "unfinished"
    write_json(RunLayout(unfinished).config, {"runtime": {"seed": 3}})
    error = one_line_error(CliRunner().invoke(main, ["compare", *map(str, replicates), str(unfinished)]))
    assert str(unfinished) in error and "report/metrics.json" in error and "job evaluate" in error
    missing = tmp_path / "absent"
    assert f"{missing} is not a directory" in one_line_error(CliRunner().invoke(main, ["compare", str(missing)]))


def test_a_report_from_an_older_job_is_one_line_naming_the_missing_key(replicates, tmp_path):
    old = metrics(0.5, [0.8, 0.8], 0.9, 0.9, 2_000)
    del old["label_efficiency"]
    older = write_run(tmp_path / "older", old, seed=4)
    error = one_line_error(CliRunner().invoke(main, ["compare", *map(str, replicates), str(older)]))
    assert str(older) in error and "label_efficiency" in error and "job evaluate" in error


def test_two_recipes_are_compared_run_by_run_for_each_seed_both_have(tmp_path, replicates):
    longer = [write_run(tmp_path / "long0", metrics(0.56, [0.9, 0.9], 0.97, 0.89, 3_000), seed=0, epochs=60),
              write_run(tmp_path / "long1", metrics(0.55, [0.9, 0.8], 0.93, 0.90, 3_200), seed=1, epochs=60),
              write_run(tmp_path / "long2", metrics(0.57, [0.9, 0.9], 0.95, 0.90, 3_100), seed=2, epochs=60)]
    text = recipes_markdown([load_run(str(path), Path()) for path in longer],
                            [load_run(str(path), Path()) for path in replicates])
    rows = table(text)
    assert text.startswith("# 3 runs against 2\n")
    assert "| measure | runs (3) | against (2) | Δ seed 0 | Δ seed 1 | Δ: mean ± s.e. over pairs |" in text
    # Seed 2 has no partner: it counts in its recipe's mean, not in the differences.
    assert rows["val rotation accuracy"] == ["0.560 ± 0.008", "0.530 ± 0.010", "+4.0", "+1.0", "+2.5 ± 1.5"]
    assert rows["2% labels: pretrained"] == ["0.883 ± 0.024", "0.825 ± 0.025", "+5.0", "+5.0", "+5.0 ± 0.0"]
    # A difference of differences stays in points; a ratio's difference is in its own unit; minutes in minutes.
    assert rows["fish/duck: Δ a random network's best depth"][2:] == ["+1.0", "+5.0", "+3.0 ± 2.0"]
    assert rows["all-class: × the same layers at random init"][2:] == ["+0.00", "+0.00", "+0.00 ± 0.00"]
    assert rows["wall time (minutes)"][2:] == ["+6.7", "+6.7", "+6.7 ± 0.0"]
    assert "- pretext.epochs: 60 (runs) / 44 (against)" in text


def test_recipes_without_a_shared_seed_are_compared_on_their_means(tmp_path, replicates):
    other = [write_run(tmp_path / "other", metrics(0.60, [0.9, 0.9], 0.9, 0.9, 2_700), seed=7)]
    text = recipes_markdown([load_run(str(path), Path()) for path in other],
                            [load_run(str(path), Path()) for path in replicates])
    assert text.startswith("# 1 run against 2\n")
    assert "| measure | runs (1) | against (2) | Δ of the means (unpaired) |" in text
    assert table(text)["val rotation accuracy"] == ["0.600", "0.530 ± 0.010", "+7.0"]
    assert "settings are the same (`runtime.seed` aside): Δ is run-to-run noise or a change" in text
    # A seed twice in one recipe: which run to pair would be a guess, so the means are compared.
    twice = [*replicates, write_run(tmp_path / "again", metrics(0.58, [0.8, 0.8], 0.9, 0.9, 2_700), seed=0)]
    text = recipes_markdown([load_run(str(path), Path()) for path in twice],
                            [load_run(str(path), Path()) for path in replicates])
    assert "Δ of the means (unpaired)" in text and "Δ seed" not in text


def test_a_measure_neither_recipe_has_is_left_out(tmp_path, replicates):
    no_knn = metrics(0.5, [0.8, 0.8], 0.9, 0.9, 2_000)
    no_knn["downstream"]["knn_val_accuracy"] = None
    runs = [load_run(str(write_run(tmp_path / "a", no_knn, seed=0)), Path())]
    text = recipes_markdown(runs, [load_run(str(write_run(tmp_path / "b", no_knn, seed=0)), Path())])
    assert "k-NN" not in text and "val rotation accuracy" in text


def test_the_command_compares_recipes_with_against(replicates, tmp_path):
    longer = write_run(tmp_path / "long0", metrics(0.56, [0.9, 0.9], 0.97, 0.89, 3_000), seed=0, epochs=60)
    args = ["compare", str(longer), *(a for path in replicates for a in ("--against", str(path)))]
    printed = CliRunner().invoke(main, args)
    assert printed.exit_code == 0, printed.output
    assert table(printed.stdout)["val rotation accuracy"] == ["0.560", "0.530 ± 0.010", "+4.0", "+4.0"]
    unfinished = tmp_path / "unfinished"
    write_json(RunLayout(unfinished).config, {"runtime": {"seed": 3}})
    error = one_line_error(CliRunner().invoke(main, ["compare", str(longer), "--against", str(unfinished)]))
    assert str(unfinished) in error and "report/metrics.json" in error


def test_the_colour_order_accuracy_is_a_row_when_a_run_has_the_task(tmp_path, replicates):
    """Runs with the colour-order task against runs without it (or older runs, whose metrics.json lacks the key):
    the row shows its accuracy and nothing for the others; with no run having it, no row."""
    coloured = metrics(0.51, [0.9, 0.9], 0.95, 0.89, 2_700)
    coloured["pretext"]["val_colour_order_accuracy"] = 0.75
    older = metrics(0.52, [0.9, 0.8], 0.96, 0.89, 2_600)
    del older["pretext"]["val_colour_order_accuracy"]
    text = recipes_markdown([load_run(str(write_run(tmp_path / "c0", coloured, seed=0)), Path())],
                            [load_run(str(write_run(tmp_path / "o0", older, seed=0)), Path())])
    row = table(text)["val colour-order accuracy"]
    assert row[0] == "0.750" and "0.750" not in row[1:]
    plain = recipes_markdown([load_run(str(path), Path()) for path in replicates[:1]],
                             [load_run(str(path), Path()) for path in replicates[1:]])
    assert "colour-order" not in plain
