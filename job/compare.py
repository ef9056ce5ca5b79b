"""Replicates side by side: several runs' metrics.json in one table, each run's column beside the mean ± std over
runs. A run is one pretext backbone; its label fractions are already means over label subsets, and one backbone's
draw moves them by several points (docs/results.md), so a recipe is judged on the mean of a few runs that differ
only in `runtime.seed`. Two recipes are compared run against run, paired by that seed (`recipes_markdown`): a
pair shares its label subsets and its random network, so their draws cancel out of the difference. No
TensorFlow here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from job.config import Config, dotted_settings
from job.console import share
from job.errors import JobError
from job.files import read_json
from job.layout import RunLayout
from job.report import frozen_feature_rows

GCS_SCHEME = "gs://"
SEED_KEY = "runtime.seed"  # the one setting replicates are expected to differ in
NOT_RECORDED = "not recorded"  # a setting added since a run was made
SECONDS_PER_MINUTE = 60
POINTS = 100  # accuracy differences are shown in points
# job/report.py's frozen-feature rows by key: the pretrained probe's own row (if shown) and the comparison's.
FEATURE_ROWS = {
    "fish_duck": ("fish/duck probe on the transferred features", "fish/duck: Δ the same layers at random init"),
    "all_class": ("all-class probe on the transferred features", "all-class: × the same layers at random init"),
    "fish_duck_vs_random_best": (None, "fish/duck: Δ a random network's best depth"),
    "fish_duck_vs_random_cv_depth": (None, "fish/duck: Δ a random network at the depth its train-label CV picks"),
    "fish_duck_cv_vs_random_best_cv": ("fish/duck probe, cross-validated on the train labels",
                                       "fish/duck, train-label CV: Δ a random network's best depth"),
    "all_class_best_depths": (None, "all-class, best depth of each: × a random network's best depth"),
}
DIGITS = {"accuracy": ".3f", "points": "+.1f", "ratio": ".2f", "minutes": ".1f"}
# How a difference between two runs' values reads: accuracies in points, the rest in their own unit.
DELTA_SCALE = {"accuracy": POINTS, "points": 1.0, "ratio": 1.0, "minutes": 1.0}
DELTA_DIGITS = {"accuracy": "+.1f", "points": "+.1f", "ratio": "+.2f", "minutes": "+.1f"}
SUFFIX = {"ratio": "×"}


@dataclass(frozen=True)
class Run:
    """One run directory's results: where it is, its metrics.json, its config.json and data identity."""

    location: str
    metrics: dict
    config: dict
    data: dict

    @property
    def seed(self) -> Any:
        return self.config.get("runtime", {}).get("seed")


@dataclass(frozen=True)
class Measure:
    """One row of the comparison: `kind` says how its values read ("accuracy", "points", "ratio", "minutes")."""

    name: str
    kind: str


def load_run(location: str, cache_dir: Path) -> Run:
    """The results of the run directory `location` (a local path or gs://); JobError when it has no report."""
    layout = RunLayout(Path())
    names = {"metrics": layout.metrics.as_posix(), "config": layout.config.as_posix(),
             "record": layout.run_record.as_posix()}
    if location.startswith(GCS_SCHEME):
        files = _fetch_gcs(location.rstrip("/"), names, cache_dir)
    elif "://" in location:
        raise JobError(f"{location} uses an unsupported scheme: pass run directories as local paths or gs:// URIs.")
    else:
        root = Path(location).expanduser()
        if not root.is_dir():
            raise JobError(f"{root} is not a directory: pass run directories (each a job's --output).")
        files = {key: path if (path := root / name).is_file() else None for key, name in names.items()}
    if files["metrics"] is None:
        raise JobError(f"{location} has no {names['metrics']}: pass runs whose `evaluate` stage finished, or "
                       f"finish it (`python -m job evaluate --data DATA --output {location}`).")
    rewrite = f"rerun `python -m job evaluate --data DATA --output {location}` to rewrite it"
    record = read_json(files["record"], rewrite) if files["record"] else {}
    config = read_json(files["config"], rewrite) if files["config"] else {}
    return Run(location, read_json(files["metrics"], rewrite), config, record.get("data", {}))


def _fetch_gcs(uri: str, names: dict[str, str], cache_dir: Path) -> dict[str, Path | None]:
    """Download the run's small result files into the cache (None for one the run does not have)."""
    from job.fetch import fetch_dataset
    from job.gcs import gcs_object_exists

    files: dict[str, Path | None] = {}
    for key, name in names.items():
        object_uri = f"{uri}/{name}"
        files[key] = fetch_dataset(object_uri, cache_dir) if gcs_object_exists(object_uri) else None
    return files


def measures(metrics: dict) -> dict[Measure, float | None]:
    """The run's verdict as named values: rotation (and colour order), each label fraction against scratch and
    colour, the frozen features against random ones, k-NN and the wall time."""
    values: dict[Measure, float | None] = {
        Measure("val rotation accuracy", "accuracy"): metrics["pretext"]["val_rotation_accuracy"],
        # left out of a table when no run has the colour-order task (older runs lack the key)
        Measure("val colour-order accuracy", "accuracy"): metrics["pretext"].get("val_colour_order_accuracy")}
    for row in metrics["label_efficiency"]:
        labels = f"{share(row['fraction'])} labels"
        means = {name: float(np.mean(row[key])) if row.get(key) else None
                 for name, key in (("pretrained", "pretrained"), ("scratch", "scratch"),
                                   ("colour", "colour_histogram"))}
        for name, value in means.items():
            values[Measure(f"{labels}: {name}", "accuracy")] = value
        for other in ("scratch", "colour"):
            values[Measure(f"{labels}: Δ {other}", "points")] = _delta(means["pretrained"], means[other], "accuracy")
    for row in frozen_feature_rows(metrics):
        accuracy, comparison = FEATURE_ROWS[row.key]
        if accuracy:
            values[Measure(accuracy, "accuracy")] = row.pretrained
        if row.ratio:
            values[Measure(comparison, "ratio")] = row.pretrained / row.random if row.known and row.random else None
        else:
            values[Measure(comparison, "points")] = _delta(row.pretrained, row.random, "accuracy")
    values[Measure("k-NN (fish/duck)", "accuracy")] = metrics["downstream"].get("knn_val_accuracy")
    total = metrics.get("timing", {}).get("total_s")
    values[Measure("wall time (minutes)", "minutes")] = total / SECONDS_PER_MINUTE if total else None
    return values


def _measures_of(run: Run) -> dict[Measure, float | None]:
    try:
        return measures(run.metrics)
    except (KeyError, TypeError) as err:
        raise JobError(f"{run.location}'s metrics.json lacks {err} (written by an older version of the job): "
                       f"rerun `python -m job evaluate --data DATA --output {run.location}` to rewrite it.") from err


def _delta(ours: float | None, theirs: float | None, kind: str) -> float | None:
    return DELTA_SCALE[kind] * (ours - theirs) if ours is not None and theirs is not None else None


def _settings_apart(groups: list[list[Run]]) -> list[tuple[str, list[str]]]:
    """(setting, each group's values) for each setting (and the data) whose values tell the groups apart,
    `runtime.seed` aside; a group's values are the distinct JSON values its runs hold, joined by commas.

    A run from before a setting existed does not record it: where the runs that do all hold its default (what
    the older code did), the setting tells nothing apart; otherwise the older runs read "not recorded"."""
    flat = [[dotted_settings(run.config) for run in group] for group in groups]
    keys = sorted(set().union(*(settings for group in flat for settings in group)) - {SEED_KEY})
    defaults = dotted_settings(Config().to_dict())
    found = []
    for key in keys:
        recorded = {json.dumps(settings[key], sort_keys=True) for group in flat for settings in group
                    if key in settings}
        if key in defaults and recorded == {json.dumps(defaults[key], sort_keys=True)}:
            continue
        cells = [", ".join(sorted({json.dumps(settings[key], sort_keys=True) if key in settings else NOT_RECORDED
                                   for settings in group}))
                 for group in flat]
        if len(set(cells)) > 1:
            found.append((key, cells))
    if len({tuple(sorted({json.dumps(run.data, sort_keys=True) for run in group})) for group in groups}) > 1:
        found.append(("data", [", ".join(sorted({run.data.get("uri", "?") for run in group})) for group in groups]))
    return found


def differences(runs: list[Run]) -> list[str]:
    """`key: value / value / …` for each setting (and the data) in which the runs differ, `runtime.seed` aside."""
    return [f"{key}: " + " / ".join(cells) for key, cells in _settings_apart([[run] for run in runs])]


def _cell(value: float | None, kind: str, std: float | None = None) -> str:
    if value is None:
        return "n/a"
    spread = f" ± {std:{DIGITS[kind].lstrip('+')}}" if std is not None else ""
    return f"{value:{DIGITS[kind]}}{SUFFIX.get(kind, '')}{spread}"


def _mean_cell(values: list[float | None], kind: str) -> str:
    """The mean ± std of the known values, with "(k of n)" where some runs lack the measure."""
    known = [v for v in values if v is not None]
    if not known:
        return "n/a"
    cell = _cell(float(np.mean(known)), kind, float(np.std(known)) if len(known) > 1 else None)
    return cell + (f" ({len(known)} of {len(values)})" if len(known) < len(values) else "")


def _head(run: Run) -> str:
    return run.location.rstrip("/").rsplit("/", 1)[-1] + (f" (seed {run.seed})" if run.seed is not None else "")


def comparison_markdown(runs: list[Run]) -> str:
    """The runs' measures side by side, with the mean ± std over the runs that have each."""
    per_run = [_measures_of(run) for run in runs]
    rows = list(dict.fromkeys(measure for values in per_run for measure in values))
    heads = [_head(run) for run in runs]
    lines = [f"# {len(runs)} run{'s' * (len(runs) != 1)} side by side", "",
             "Each run is one pretext backbone; its label-fraction rows are means over its own label subsets; Δ in "
             "points; the last column is the mean ± std over runs.", "",
             "| measure | " + " | ".join(heads) + " | mean ± std |", "|---" * (len(runs) + 2) + "|"]
    for measure in rows:
        values = [values.get(measure) for values in per_run]
        lines.append(f"| {measure.name} | " + " | ".join(_cell(v, measure.kind) for v in values)
                     + f" | {_mean_cell(values, measure.kind)} |")
    if other := differences(runs):
        lines += ["", f"These runs differ in more than `{SEED_KEY}`, so the mean mixes recipes:", ""]
        lines += [f"- {line}" for line in other]
    return "\n".join(lines) + "\n"


def _delta_cell(value: float | None, kind: str, se: float | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:{DELTA_DIGITS[kind]}}" + (f" ± {se:{DELTA_DIGITS[kind].lstrip('+')}}" if se is not None else "")


def recipe_differences(runs: list[Run], against: list[Run]) -> list[str]:
    """`key: value (runs) / value (against)` for each setting (and the data) that tells the two recipes apart."""
    return [f"{key}: {ours} (runs) / {theirs} (against)" for key, (ours, theirs) in _settings_apart([runs, against])]


def _pairs(runs: list[Run], ours: list[dict], against: list[Run], theirs: list[dict]) -> list[tuple]:
    """(seed, runs' measures, against's measures) for each seed both groups have, once each; none when a group
    holds a seed twice (which of its runs to pair would be a guess)."""
    seeds = [[run.seed for run in group if run.seed is not None] for group in (runs, against)]
    if any(len(set(group)) < len(group) for group in seeds):
        return []
    by_seed = {run.seed: values for run, values in zip(against, theirs) if run.seed is not None}
    return [(run.seed, values, by_seed[run.seed]) for run, values in zip(runs, ours) if run.seed in by_seed]


def recipes_markdown(runs: list[Run], against: list[Run]) -> str:
    """Two recipes: each one's mean ± std over its runs, and the difference `runs` − `against` run by run for each
    runtime.seed both have, with its mean ± standard error over those pairs (the difference of the two means,
    marked unpaired, when no seed is shared)."""
    ours, theirs = [_measures_of(run) for run in runs], [_measures_of(run) for run in against]
    pairs = _pairs(runs, ours, against, theirs)
    rows = list(dict.fromkeys(measure for values in [*ours, *theirs] for measure in values))
    heads = [f"runs ({len(runs)})", f"against ({len(against)})", *(f"Δ seed {seed}" for seed, _, _ in pairs),
             "Δ: mean ± s.e. over pairs" if pairs else "Δ of the means (unpaired)"]
    lines = [f"# {len(runs)} run{'s' * (len(runs) != 1)} against {len(against)}", "",
             "runs: " + ", ".join(_head(run) for run in runs), "",
             "against: " + ", ".join(_head(run) for run in against), "",
             "Means ± std over each recipe's runs; Δ = runs − against (accuracies in points), run by run for each "
             f"`{SEED_KEY}` both have: the two runs of a pair share their label subsets and their random network.", "",
             "| measure | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for measure in rows:
        kind = measure.kind
        mine, other = [v.get(measure) for v in ours], [v.get(measure) for v in theirs]
        if all(v is None for v in [*mine, *other]):
            continue  # neither recipe measured it (e.g. runs without the scratch baseline)
        deltas = [_delta(a.get(measure), b.get(measure), kind) for _, a, b in pairs]
        if pairs:
            known = [d for d in deltas if d is not None]
            se = float(np.std(known, ddof=1) / np.sqrt(len(known))) if len(known) > 1 else None
            summary = _delta_cell(float(np.mean(known)), kind, se) if known else "n/a"
        else:
            known_mine, known_other = [v for v in mine if v is not None], [v for v in other if v is not None]
            summary = _delta_cell(_delta(float(np.mean(known_mine)), float(np.mean(known_other)), kind), kind) \
                if known_mine and known_other else "n/a"
        cells = [_mean_cell(mine, kind), _mean_cell(other, kind), *(_delta_cell(d, kind) for d in deltas), summary]
        lines.append(f"| {measure.name} | " + " | ".join(cells) + " |")
    if told_apart := recipe_differences(runs, against):
        lines += ["", "The recipes differ in:", ""] + [f"- {line}" for line in told_apart]
    else:
        lines += ["", f"The recipes' settings are the same (`{SEED_KEY}` aside): Δ is run-to-run noise or a change "
                      "in the code."]
    for name, group in (("runs", runs), ("against", against)):
        if mixed := differences(group):
            lines += ["", f"The {name} differ among themselves in more than `{SEED_KEY}`:", ""]
            lines += [f"- {line}" for line in mixed]
    return "\n".join(lines) + "\n"
