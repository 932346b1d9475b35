"""PNG figures that open anywhere, offline: per-class accuracy against the class's train count
with a reliability diagram beside it, and training curves. `dvc plots show` renders the same data as an HTML page that loads vega
from a CDN (blank without internet); these are drawn with matplotlib's Agg backend instead.

Figures are built on `matplotlib.figure.Figure` (no pyplot state) and saved without the
`Software` metadata, which would put matplotlib's URL into every PNG.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from pipeline.errors import UserError
from pipeline.params import EvaluateParams, Params

DPI = 100
PANEL_SIZE = (4.2, 3.4)  # inches per panel


@dataclass(frozen=True)
class PerClass:
    """One model's per-class test accuracy (results/NAME/per_class.csv) and its label."""

    label: str  # e.g. "teacher (resnet20)"
    train_counts: list[int]
    top1: list[float]  # % per class; NaN for a class without test images


def read_per_class(path: str | Path, label: str) -> PerClass:
    """A per_class.csv written by pipeline.train.evaluate.write_report."""
    with open(path, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    return PerClass(label, [int(row["train_count"]) for row in rows],
                    [float(row["top1"]) for row in rows])


@dataclass(frozen=True)
class Reliability:
    """One model's reliability bins (results/NAME/reliability.csv) and its label."""

    label: str
    confidence: list[float]  # mean confidence of each non-empty bin (fraction)
    accuracy: list[float]  # accuracy of each non-empty bin (fraction)
    count: list[int]  # samples per non-empty bin

    @classmethod
    def from_bins(cls, label: str, bins: list[dict]) -> "Reliability":
        """From pipeline.train.evaluate.reliability_bins's rows (empty bins left out)."""
        kept = [row for row in bins if int(row["count"]) > 0]
        return cls(label, [float(row["confidence"]) for row in kept],
                   [float(row["accuracy"]) for row in kept], [int(row["count"]) for row in kept])


def read_reliability(path: str | Path, label: str) -> Reliability:
    """A reliability.csv written by pipeline.train.evaluate.write_reliability."""
    with open(path, newline="") as stream:
        return Reliability.from_bins(label, list(csv.DictReader(stream)))


def read_curve(live_dir: str | Path, metric: str) -> tuple[list[int], list[float]]:
    """(epochs from 1, values) of one dvclive metric, e.g. "train/loss" or "val/top1";
    empty when the model logged none (e.g. no epoch trained)."""
    path = Path(live_dir) / "plots" / "metrics" / f"{metric}.tsv"
    if not path.is_file():
        return [], []
    with open(path, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream, delimiter="\t"))
    name = metric.rsplit("/", 1)[-1]
    return [int(row["step"]) + 1 for row in rows], [float(row[name]) for row in rows]


def plot_per_class(models: list[PerClass], settings: EvaluateParams, out: str | Path, *,
                   reliability: list[Reliability] = ()) -> None:
    """Per-class top-1 (%) against train count (log x), one panel per model side by side, with
    the many / medium / few boundaries of `settings` and each model's mean class accuracy;
    given `reliability`, one more panel: their reliability diagrams together."""
    panels = len(models) + bool(reliability)
    figure = Figure(figsize=(PANEL_SIZE[0] * panels, PANEL_SIZE[1]), layout="constrained")
    all_axes = figure.subplots(1, panels, squeeze=False)[0]
    axes = all_axes[:len(models)]
    for ax in axes[1:]:  # the per-class panels share their axes; the reliability one does not
        ax.sharex(axes[0])
        ax.sharey(axes[0])
        ax.tick_params(labelleft=False)
    counts = [n for model in models for n in model.train_counts]
    low, high = min(counts) / 1.25, max(counts) * 1.25
    for ax, model in zip(axes, models):
        accuracies = [a for a in model.top1 if not math.isnan(a)]
        mean = sum(accuracies) / len(accuracies) if accuracies else float("nan")
        ax.scatter(model.train_counts, model.top1, s=18, alpha=0.8)
        ax.axhline(mean, color="grey", linestyle=":")
        # Group boundaries: few < few_below <= medium <= many_above < many.
        for boundary, below, above in ((settings.few_below - 0.5, "few", "medium"),
                                       (settings.many_above + 0.5, "medium", "many")):
            if low < boundary < high:
                ax.axvline(boundary, color="lightgrey", linestyle="--")
                ax.text(boundary, 0.5, f"{below} | {above}", ha="center", va="center",
                        rotation=90, backgroundcolor="white",
                        fontsize="x-small", color="grey", transform=ax.get_xaxis_transform())
        ax.set(xscale="log", xlim=(low, high), ylim=(-3, 103),
               title=f"{model.label}: class mean {mean:.1f}%",
               xlabel="train images of the class (log)")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    axes[0].set_ylabel("test top-1 of the class (%)")
    if reliability:
        plot_reliability(all_axes[-1], reliability)
    _save(figure, out)


def plot_reliability(ax, models: list[Reliability]) -> None:
    """Reliability diagram on `ax`: each model's accuracy against mean confidence per
    confidence bin (15 equal-width bins; marker area grows with the bin's samples), and the
    diagonal of perfect calibration. Points below the diagonal are over-confident."""
    ax.plot([0, 1], [0, 1], color="lightgrey", linestyle="--", label="calibrated")
    for index, model in enumerate(models):
        total = sum(model.count) or 1
        ax.plot(model.confidence, model.accuracy, color=f"C{index}", label=model.label)
        ax.scatter(model.confidence, model.accuracy, color=f"C{index}",
                   s=[4 + 200 * n / total for n in model.count], alpha=0.7)
    ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", title="reliability (test, 15 bins)",
           xlabel="mean confidence of the bin", ylabel="accuracy of the bin")
    ax.legend(fontsize="x-small", loc="upper left")


def plot_training_curves(curves: dict[str, Path], out: str | Path) -> None:
    """Train loss and validation top-1 per epoch, one line per model (label -> dvclive dir)."""
    figure = Figure(figsize=(PANEL_SIZE[0] * 2, PANEL_SIZE[1]), layout="constrained")
    loss_ax, top1_ax = figure.subplots(1, 2)
    for index, (label, live_dir) in enumerate(curves.items()):
        for ax, metric in ((loss_ax, "train/loss"), (top1_ax, "val/top1")):
            epochs, values = read_curve(live_dir, metric)
            if epochs:  # one colour per model in both panels, even where it has no curve
                ax.plot(epochs, values, marker="." if len(epochs) < 40 else None, label=label,
                        color=f"C{index}")
    loss_ax.set(title="training loss (each model's own objective)", xlabel="epoch",
                ylabel="mean loss of the epoch")
    top1_ax.set(title="validation top-1", xlabel="epoch", ylabel="top-1 (%)")
    for ax in (loss_ax, top1_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize="small")
    _save(figure, out)


def _save(figure: Figure, out: str | Path) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    # metadata Software None: no matplotlib URL in the file (the PNGs reference nothing remote)
    figure.savefig(out, dpi=DPI, metadata={"Software": None})


def write_figures(params: Params, results_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """The comparison figures of every model in params (its teachers, then the student) from
    their results folders: out_dir/per_class.png (side by side, with their reliability
    diagrams in one more panel) and training_curves.png.
    Models without results yet are left out. Returns the paths written."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    models = {**params.teachers, "student": params.student}
    labels = {name: f"{name} ({model.arch})" for name, model in models.items()}
    evaluated = [read_per_class(results_dir / name / "per_class.csv", labels[name])
                 for name in models if (results_dir / name / "per_class.csv").is_file()]
    reliability = [read_reliability(results_dir / name / "reliability.csv", labels[name])
                   for name in models if (results_dir / name / "reliability.csv").is_file()]
    if not evaluated:
        raise UserError(f"{results_dir}: no NAME/per_class.csv for any model of the params "
                        f"({', '.join(models)}); run the evaluate stages first")
    written = [out_dir / "per_class.png", out_dir / "training_curves.png"]
    plot_per_class(evaluated, params.evaluate, written[0], reliability=reliability)
    plot_training_curves({name: results_dir / name / "train" for name in models}, written[1])
    return written
