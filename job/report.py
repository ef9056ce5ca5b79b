"""metrics.json (the job's result interface), report.md and its PNG figures. No TensorFlow here.

metrics.json keys are documented in the README; `METRIC_KEYS` lists the dotted keys always present.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from job.console import count, share  # noqa: E402
from job.files import atomic_path, write_json, write_text  # noqa: E402

log = logging.getLogger(__name__)

DOWNSTREAM_KINDS = ("pretrained", "scratch", "s4l")  # timing.downstream_<kind>_s (job/evaluations.py)
LABEL_EFFICIENCY_COLUMNS = ("pretrained", "scratch", "colour_histogram", "s4l")  # metrics.json's label_efficiency

METRIC_KEYS = (
    "pretext.val_rotation_accuracy",
    "pretext.online_probe_val_accuracy",
    "pretext.val_colour_order_accuracy",
    "pretext.linear_probe_200_top1",
    "pretext.random_linear_probe_200_top1",
    "pretext.linear_probe_200_by_depth",
    "pretext.epochs",
    "pretext.train_seconds",
    "pretext.samples_per_sec",
    "downstream.val_accuracy",
    "downstream.val_accuracy_std",
    "downstream.val_accuracy_seeds",
    "downstream.best_epoch_val_accuracy",
    "downstream.transfer_layers",
    "downstream.transfer_selection",
    "downstream.head_init",
    "downstream.linear_probe_val_accuracy",
    "downstream.random_linear_probe_val_accuracy",
    "downstream.linear_probe_cv_accuracy",
    "downstream.random_linear_probe_cv_accuracy",
    "downstream.knn_val_accuracy",
    "downstream.knn_k",
    "downstream.depth_probe",
    "downstream.depth_probe_cv",
    "downstream.confusion_matrix",
    "downstream.train_images",
    "downstream.val_images",
    "downstream.seeds",
    "baseline.scratch_val_accuracy",
    "baseline.scratch_val_accuracy_std",
    "baseline.colour_histogram_val_accuracy",
    "baseline.colour_histogram_val_accuracy_std",
    "label_efficiency",
    "timing.decode_s",
    "timing.pretext_train_s",
    "timing.frozen_probes_s",
    "timing.downstream_s",
    "timing.colour_baseline_s",
    "timing.pretext_other_s",
    "timing.downstream_pretrained_s",
    "timing.downstream_scratch_s",
    "timing.downstream_s4l_s",
    "timing.evaluate_setup_s",
    "timing.evaluations",
    "timing.report_s",
    "timing.total_s",
    "timing.outside_pretext_fraction",
    "data.train_images",
    "data.val_images",
    "data.skipped_images",
)


@dataclass
class Examples:
    """Images and predictions drawn in the report."""

    rotated_images: np.ndarray  # [4N, H, W, 3] uint8, block k rotated by k*90°
    rotation_true: np.ndarray  # degrees
    rotation_predicted: np.ndarray  # degrees
    val_images: np.ndarray
    val_true: np.ndarray
    val_predicted: np.ndarray
    class_names: list[str]
    count: int


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))


def build_metrics(pretext: dict, evaluations: dict, data: dict, entries: dict[str, Any]) -> dict:
    """Assemble metrics.json from the stages' results: pretext's done.json, evaluate's (`evaluations`), the data
    and the evaluations' own entries by dotted key (job/evaluations.py `metrics`)."""
    finetunes = evaluations["finetune"]
    accuracies = [r["val_accuracy"] for r in finetunes]
    mean, std = _mean_std(accuracies)
    first = finetunes[0]
    metrics = {
        "pretext": {
            "val_rotation_accuracy": pretext["val_rotation_accuracy"],
            "online_probe_val_accuracy": pretext.get("online_probe_val_accuracy"),
            "val_colour_order_accuracy": pretext.get("val_colour_order_accuracy"),
            "epochs": pretext["epochs"],
            "train_seconds": pretext["train_seconds"],
            "samples_per_sec": pretext["samples_per_sec"],
            "train_images": pretext["train_images"],
            "history": pretext["history"],
        },
        "downstream": {
            "mode": first["mode"],
            "label_fraction": first["label_fraction"],
            "val_accuracy": mean,
            "val_accuracy_std": std,
            "val_accuracy_seeds": accuracies,
            "best_epoch_val_accuracy": float(np.mean([r["best_epoch_val_accuracy"] for r in finetunes])),
            "transfer_layers": evaluations.get("transfer_layers", ["out_relu"]),
            "transfer_selection": evaluations.get("transfer_selection"),
            "head_init": first.get("head_init", "random"),
            "confusion_matrix": first["confusion_matrix"],
            "train_images": first["train_images"],
            "val_images": first["val_images"],
            "seeds": [r["seed"] for r in finetunes],
            "history": first["history"],
        },
        "baseline": {},
        "label_efficiency": evaluations["label_efficiency"],
        "timing": _timing(pretext, evaluations.get("timing", {}), data),
        "data": {
            "train_images": data["train_images"],
            "val_images": data["val_images"],
            "skipped_images": data["skipped_images"],
            "skipped_files": data["skipped_files"],
            "decode_images_per_sec": data.get("decode_images_per_sec"),
        },
    }
    for dotted, value in entries.items():
        *sections, key = dotted.split(".")
        place = metrics
        for section in sections:
            place = place.setdefault(section, {})
        place[key] = value
    return metrics


def _timing(pretext: dict, evaluate: dict, data: dict) -> dict:
    """timing.*: where the job's wall time went (README: metrics.json). report_s and the totals are added
    when the report is written (`write_report`)."""
    wall = pretext.get("wall_seconds")
    return {
        "decode_s": data.get("decode_seconds"),
        "pretext_train_s": pretext["train_seconds"],
        "pretext_other_s": None if wall is None else max(0.0, wall - pretext["train_seconds"]),
        "frozen_probes_s": evaluate.get("frozen_probes_s"),
        "downstream_s": evaluate.get("downstream_s"),
        **{f"downstream_{kind}_s": evaluate.get(f"downstream_{kind}_s") for kind in DOWNSTREAM_KINDS},
        "colour_baseline_s": evaluate.get("colour_baseline_s"),
        "evaluate_setup_s": evaluate.get("evaluate_setup_s"),
        "evaluations": evaluate.get("evaluations", {}),
        "report_s": evaluate.get("report_s"),  # recorded when the evaluate stage completed
        "total_s": None,
        "outside_pretext_fraction": None,
    }


def add_report_time(metrics: dict, seconds: float | None) -> None:
    """Set timing.report_s, and timing.total_s (the sum of the parts, unknown ones as 0) with the share of it
    spent outside pretext training."""
    timing = metrics["timing"]
    timing["report_s"] = seconds
    evaluations = sum(timing["evaluations"].values())  # their downstream runs are in downstream_s
    parts = (timing["decode_s"], timing["pretext_train_s"], timing["pretext_other_s"], timing["downstream_s"],
             timing["evaluate_setup_s"], evaluations, seconds)
    total = sum(part or 0.0 for part in parts)
    timing["total_s"] = total
    timing["outside_pretext_fraction"] = 1.0 - (timing["pretext_train_s"] or 0.0) / total if total else None


def lookup(metrics: dict, dotted: str):
    """metrics["a"]["b"] for "a.b"; KeyError when absent."""
    value = metrics
    for part in dotted.split("."):
        value = value[part]
    return value


def write_report(directory: Path, metrics: dict, examples: Examples, started: float | None = None) -> Path:
    """Write the figures, metrics.json and report.md into `directory`; returns the report's path. `started`: when
    the report's work began (time.perf_counter()), measured into timing.report_s; without it the report_s
    recorded with the results is kept (a rewritten report of a completed stage: the same metrics.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    figures = {
        "curves.png": _plot_curves(metrics),
        "confusion_matrix.png": _plot_confusion(metrics, examples.class_names),
        "val_predictions.png": _plot_predictions(examples),
        "pretext_rotations.png": _plot_rotations(examples),
    }
    if _label_efficiency_rows(metrics):  # none when evaluate.evaluations leaves the fine-tunes out
        figures["label_efficiency.png"] = _plot_label_efficiency(metrics)
    for name, figure in figures.items():
        with atomic_path(directory / name) as tmp:
            figure.savefig(tmp, dpi=100, bbox_inches="tight")
        plt.close(figure)
    add_report_time(metrics, metrics["timing"]["report_s"] if started is None else time.perf_counter() - started)
    write_json(directory / "metrics.json", metrics)
    path = directory / "report.md"
    write_text(path, _markdown(metrics, list(figures)))
    log.info("Report written to %s", path)
    return path


def _fmt(value, std=None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" + (f" ± {std:.4f}" if std is not None else "")
    return str(value)


def _markdown(metrics: dict, figures: list[str]) -> str:
    p, d, b, data = metrics["pretext"], metrics["downstream"], metrics["baseline"], metrics["data"]
    seeds = len(d["seeds"])
    rows = [
        ("Pretext val rotation accuracy (4-way, chance 0.25)", _fmt(p["val_rotation_accuracy"])),
        ("Pretext online probe val accuracy (stop-gradient)", _fmt(p["online_probe_val_accuracy"])),
        ("Pretext val colour-order accuracy (6-way, chance 0.17)", _fmt(p["val_colour_order_accuracy"])),
        ("Pretext linear probe, all classes, val top-1", _fmt(p["linear_probe_200_top1"])),
        ("Pretext epochs / train seconds / samples per s",
         f"{p['epochs']} / {p['train_seconds']:.0f} / {p['samples_per_sec']:.0f}"),
        (f"Downstream val accuracy, {d['mode']}, {share(d['label_fraction'])} of the labels (mean ± std, "
         f"{count(seeds, 'seed')})", _fmt(d["val_accuracy"], d["val_accuracy_std"])),
        ("Downstream best-epoch val accuracy (optimistic: selected on val)", _fmt(d["best_epoch_val_accuracy"])),
        (f"Scratch baseline, same recipe (mean ± std, {count(seeds, 'seed')})",
         _fmt(b["scratch_val_accuracy"], b["scratch_val_accuracy_std"])),
        ("Colour-histogram baseline: logistic regression on RGB histograms, no network (mean ± std)",
         _fmt(b["colour_histogram_val_accuracy"], b["colour_histogram_val_accuracy_std"])),
        ("Linear probe on frozen features, val accuracy", _fmt(d["linear_probe_val_accuracy"])),
        (f"k-NN ({_knn_words(d)}) on frozen features, val accuracy", _fmt(d["knn_val_accuracy"])),
        ("Transfer layers (the backbone cut after the deepest)", _transfer_words(d)),
        ("Downstream train / val images", f"{d['train_images']} / {d['val_images']}"),
        ("Data train / val / skipped images", f"{data['train_images']} / {data['val_images']} / "
         f"{data['skipped_images']}"),
    ]
    lines = ["# Rotation pretraining report", "", *_verdict(metrics), "## Details", "", "| metric | value |",
             "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    for by_depth, cross_validated, title in (
        (d.get("depth_probe"), d.get("depth_probe_cv"), "Linear probe by depth (downstream val accuracy, all labels"),
        (p.get("linear_probe_200_by_depth"), None, "All-class linear probe by depth (val top-1"),
    ):
        if by_depth:
            heads = ["layer", "pretrained", "random init"]
            rows_by_depth = [[r["layer"], _fmt(r["pretrained"]), _fmt(r["random"])] for r in by_depth]
            if cross_validated:  # runs from before the cross-validated rows lack them
                heads += ["pretrained, train-label CV", "random init, train-label CV"]
                for cells, cv in zip(rows_by_depth, cross_validated, strict=True):
                    cells += [_fmt(cv["pretrained"]), _fmt(cv["random"])]
            lines += ["", f"## {title}, frozen pooled features)", "", f"| {' | '.join(heads)} |",
                      "|---" * len(heads) + "|"]
            lines += [f"| {' | '.join(cells)} |" for cells in rows_by_depth]
    lines += ["", f"Downstream numbers are the mean ± standard deviation over {count(seeds, 'seed')} of the "
              "downstream stage, on the val images of the two classes.", ""]
    if data["skipped_images"]:
        lines += ["Skipped unreadable images: " + ", ".join(data["skipped_files"]), ""]
    lines += [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def _layers(downstream: dict) -> str:
    """The transfer layers as metrics.json's transfer_selection names a candidate: joined by "+"."""
    return "+".join(downstream.get("transfer_layers") or ["out_relu"])


def _transfer_words(downstream: dict) -> str:
    """The transfer layers, and with ["auto"] their cross-validated score beside the best candidate's."""
    layers, scores = _layers(downstream), downstream.get("transfer_selection")
    if not scores:
        return layers
    best = max(scores, key=scores.get)
    beside = "the best" if best == layers else f"the best: {best}, {scores[best]:.3f}"
    return f"{layers}, chosen by cross-validation on the train labels ({scores[layers]:.3f}; {beside})"


def _knn_words(downstream: dict) -> str:
    """'cosine, k = 20', with a note when evaluate.knn_k was capped below the number of train images."""
    k, configured = downstream.get("knn_k"), downstream.get("knn_k_configured")
    if k is None:
        return "cosine"
    note = f"; evaluate.knn_k = {configured}, capped below the number of train images" if (
        configured is not None and configured != k) else ""
    return f"cosine, k = {k}{note}"


def _delta(a: list[float], b: list[float]) -> str:
    """mean(a) - mean(b) in points, signed; n/a when either is missing."""
    if not a or not b:
        return "n/a"
    return f"{100 * (np.mean(a) - np.mean(b)):+.1f}"


def verdict_markdown(metrics: dict) -> str:
    """The report's verdict section (also TensorBoard's `verdict` text, job/summaries.py)."""
    return "\n".join(_verdict(metrics)).strip() + "\n"


def _label_efficiency_rows(metrics: dict) -> list[dict]:
    """The label fractions with any result (pretrained, scratch, colour or S4L): none when the evaluation left the
    label-efficiency runs and the baselines out."""
    return [row for row in metrics["label_efficiency"] if any(row.get(key) for key in LABEL_EFFICIENCY_COLUMNS)]


def _verdict(metrics: dict) -> list[str]:
    """The report's first table: what pretraining bought over scratch and colour, and over random features; the
    parts whose evaluations did not run are left out, and said to be."""
    return ["## Verdict", "", *_label_efficiency_verdict(metrics), *_frozen_feature_verdict(metrics)]


def _label_efficiency_verdict(metrics: dict) -> list[str]:
    rows = _label_efficiency_rows(metrics)
    if not rows:
        return ["No fish vs duck fine-tunes or baselines ran in this evaluation (`evaluate.evaluations`, "
                "`evaluate.label_fractions`), so nothing here says what pretraining bought over scratch or colour.",
                ""]
    s4l = any(row.get("s4l") for row in rows)
    extra = " S4L (pretrained) | Δ scratch (S4L) |" if s4l else ""
    lines = ["Fish vs duck val accuracy, mean ± std over seeds (each its own label subset); Δ in points.", "",
             f"| labels | seeds | pretrained | scratch | colour histogram | Δ scratch | Δ colour |{extra}",
             "|---|---|---|---|---|---|---|" + ("---|---|" if s4l else "")]
    for row in rows:
        ours, scratch, colour = row["pretrained"], row["scratch"], row.get("colour_histogram", [])
        seeds = max(len(ours), len(scratch), len(colour))
        line = (f"| {share(row['fraction'])} | {seeds} | {_fmt(*_mean_std(ours))} | {_fmt(*_mean_std(scratch))} | "
                f"{_fmt(*_mean_std(colour))} | {_delta(ours, scratch)} | {_delta(ours, colour)} |")
        if s4l:
            joint = row.get("s4l", [])
            line += f" {_fmt(*_mean_std(joint))} | {_delta(joint, scratch)} |"
        lines.append(line)
    if s4l:
        lines += ["", "S4L: fine-tuned jointly with the rotation loss on all downstream train images (finetune.mode = "
                  "\"s4l\"), a row of its own beside the pure transfer numbers."]
    lines += ["", "The seeds above share one pretrained backbone, and another backbone (`--set runtime.seed=N`) can "
              "move the few-label rows by several points: `python -m job compare RUN...` puts such replicates side "
              "by side with their mean.", ""]
    return lines


def _frozen_feature_verdict(metrics: dict) -> list[str]:
    rows = [row for row in frozen_feature_rows(metrics) if row.pretrained is not None or row.random is not None]
    if not rows:
        return ["No frozen-feature probes ran in this evaluation (`evaluate.evaluations` and the probes' switches).",
                ""]
    lines = ["Frozen features (linear probes; pretrained vs the same network at random init; Δ in points, and "
             "for the all-class probes pretrained / random):", "",
             "| probe | pretrained | random init | Δ |", "|---|---|---|---|"]
    for row in rows:
        delta = _delta([row.pretrained], [row.random]) if row.known else "n/a"
        if row.ratio and row.known and row.random:
            delta += f" ({row.pretrained / row.random:.2f}×)"
        lines.append(f"| {row.name} | {_fmt(row.pretrained)} | {_fmt(row.random)} | {delta} |")
    return [*lines, ""]


@dataclass(frozen=True)
class FeatureRow:
    """One frozen-feature comparison: a probe's accuracy on the pretrained network and on a random one."""

    key: str  # stable across runs (job/compare.py): the name below holds layer names that differ between runs
    name: str
    pretrained: float | None
    random: float | None
    ratio: bool  # the all-class probes, far from a binary probe's 0.5, read better as a ratio

    @property
    def known(self) -> bool:
        return self.pretrained is not None and self.random is not None


def frozen_feature_rows(metrics: dict) -> list[FeatureRow]:
    """The verdict's frozen-feature rows: the transferred features against the same random layers, and each
    network's best depth; rows whose probes were switched off are left out (the depth ones) or read n/a."""
    d, p = metrics["downstream"], metrics["pretext"]
    layers = _layers(d)
    rows = [
        FeatureRow("fish_duck", f"fish/duck on the transferred features ({layers})", d["linear_probe_val_accuracy"],
                   d.get("random_linear_probe_val_accuracy"), False),
        FeatureRow("all_class", "all-class (200-way) on the transferred features", p.get("linear_probe_200_top1"),
                   p.get("random_linear_probe_200_top1"), True),
    ]
    if depth := d.get("depth_probe"):
        best_random = max(depth, key=lambda r: r["random"])
        rows.append(FeatureRow("fish_duck_vs_random_best",
                               f"fish/duck: transferred features vs random's best depth ({best_random['layer']})",
                               d["linear_probe_val_accuracy"], best_random["random"], False))
    # The best depth above is picked on the val images it is scored on, so it reads high; these two pick it on
    # the train labels alone (runs from before them lack the keys and leave the rows out).
    if depth and (cross_validated := d.get("depth_probe_cv")):
        picked = max(cross_validated, key=lambda r: r["random"])
        at_picked = next(r["random"] for r in depth if r["layer"] == picked["layer"])
        rows.append(FeatureRow("fish_duck_vs_random_cv_depth",
                               f"fish/duck: transferred features vs random at the depth its train-label "
                               f"cross-validation picks ({picked['layer']})",
                               d["linear_probe_val_accuracy"], at_picked, False))
        if d.get("linear_probe_cv_accuracy") is not None:
            rows.append(FeatureRow("fish_duck_cv_vs_random_best_cv",
                                   f"fish/duck, cross-validated on the {d['train_images']} train labels instead of "
                                   f"val: transferred features vs random's best depth ({picked['layer']})",
                                   d["linear_probe_cv_accuracy"], picked["random"], False))
    if by_depth := p.get("linear_probe_200_by_depth"):
        ours, theirs = max(by_depth, key=lambda r: r["pretrained"]), max(by_depth, key=lambda r: r["random"])
        rows.append(FeatureRow("all_class_best_depths",
                               f"all-class (200-way): best depth of each ({ours['layer']} vs {theirs['layer']})",
                               ours["pretrained"], theirs["random"], True))
    return rows


def _plot_curves(metrics: dict):
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (stage, keys) in zip(axes, (
        ("pretext", ("train_rotation_accuracy", "rotation_accuracy", "train_online_probe_accuracy",
                     "online_probe_accuracy", "train_loss", "loss")),
        ("downstream", ("train_accuracy", "accuracy", "train_loss", "loss")),
    )):
        history = metrics[stage]["history"]
        for key in keys:
            measured = [h for h in history if key in h]  # val metrics only where evaluated (eval_every_epochs)
            if measured:
                label = key if key.startswith("train_") else f"val_{key}"
                ax.plot([h["epoch"] for h in measured], [h[key] for h in measured], marker="o", label=label)
        ax.set_title(f"{stage} (seed 0)" if stage == "downstream" else stage)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return figure


def _plot_confusion(metrics: dict, names: list[str]):
    matrix = np.asarray(metrics["downstream"]["confusion_matrix"])
    figure, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=14)
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Downstream confusion matrix (val)")
    return figure


def _image_grid(images, titles, colours, columns: int):
    rows = max(1, -(-len(images) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.8), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, title, colour in zip(axes.ravel(), images, titles, colours):
        ax.imshow(image)
        ax.set_title(title, fontsize=8, color=colour)
    return figure


def _plot_predictions(examples: Examples):
    count = min(examples.count, len(examples.val_true))
    names = examples.class_names
    titles = [f"true {names[t]}\npred {names[p]}" for t, p in zip(examples.val_true, examples.val_predicted)]
    colours = ["green" if t == p else "red" for t, p in zip(examples.val_true, examples.val_predicted)]
    return _image_grid(examples.val_images[:count], titles[:count], colours[:count], columns=8)


def _plot_rotations(examples: Examples):
    images = examples.rotated_images
    per_block = len(images) // 4
    order = [k * per_block + i for i in range(per_block) for k in range(4)]  # each row: one image, 4 angles
    titles = [f"{examples.rotation_true[i]}° → {examples.rotation_predicted[i]}°" for i in order]
    colours = ["green" if examples.rotation_true[i] == examples.rotation_predicted[i] else "red" for i in order]
    return _image_grid(images[order], titles, colours, columns=4)


def _plot_label_efficiency(metrics: dict):
    rows = metrics["label_efficiency"]
    figure, ax = plt.subplots(figsize=(5, 4))
    for key in LABEL_EFFICIENCY_COLUMNS:
        shown = [r for r in rows if r.get(key)]
        if not shown:
            continue
        means, stds = [np.mean(r[key]) for r in shown], [np.std(r[key]) for r in shown]
        style = {"linestyle": "--", "color": "grey"} if key == "colour_histogram" else {}
        ax.errorbar([r["fraction"] for r in shown], means, yerr=stds, marker="o", capsize=3,
                    label=key.replace("_", " ") if key != "s4l" else "S4L (pretrained)", **style)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of downstream labels")
    ax.set_ylabel("val accuracy")
    ax.set_title("Label efficiency")
    ax.legend()
    ax.grid(alpha=0.3)
    return figure
