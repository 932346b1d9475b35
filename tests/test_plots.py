"""PNG figures that open offline: written by the evaluate and figures stages, declared as
image plots in dvc.yaml, and free of any reference to a remote URL; the committed ones are those
dvc.lock records, one drawn panel per model."""

import hashlib
import re
from pathlib import Path

import numpy as np
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.params import EvaluateParams
from pipeline import tools
from pipeline.tools.plots import (DPI, PANEL_SIZE, plot_per_class, plot_training_curves,
                                  read_curve, read_per_class, read_reliability)
from stages.figures import main as figures_stage

REPO = Path(__file__).resolve().parents[1]
REMOTE = re.compile(rb"(?i)(https?:|ftp:|//cdn|www\.)")
TRAIN_COUNTS = [104, 80, 61, 47, 36, 27, 21, 16, 13, 10]  # the digits-LT profile


def write_results(results: Path, name: str, top1: list[float], epochs: int) -> None:
    """results/NAME/per_class.csv and dvclive's train/loss + val/top1 TSVs, as the stages do."""
    folder = results / name
    (folder / "train/plots/metrics/train").mkdir(parents=True)
    (folder / "train/plots/metrics/val").mkdir(parents=True)
    rows = [f"{c},{c},{n},50,{a}" for c, (n, a) in enumerate(zip(TRAIN_COUNTS, top1))]
    (folder / "per_class.csv").write_text("class,name,train_count,test_count,top1\n"
                                          + "\n".join(rows) + "\n")
    (folder / "train/plots/metrics/train/loss.tsv").write_text(
        "step\tloss\n" + "".join(f"{e}\t{2.0 / (e + 1)}\n" for e in range(epochs)))
    (folder / "train/plots/metrics/val/top1.tsv").write_text(
        "step\ttop1\n" + "".join(f"{e}\t{50 + e}\n" for e in range(epochs)))
    bins = [f"{m},{m / 15},{(m + 1) / 15},{10 * m},{(m + 0.5) / 15},{top1[0] / 100 * m / 15}"
            if m > 3 else f"{m},{m / 15},{(m + 1) / 15},0,nan,nan" for m in range(15)]
    (folder / "reliability.csv").write_text("bin,lower,upper,count,confidence,accuracy\n"
                                            + "\n".join(bins) + "\n")


def assert_offline_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), path
    assert not REMOTE.search(data), f"{path} references a remote URL"
    with Image.open(path) as image:
        assert image.size[0] >= 300 and image.size[1] >= 200
        assert "Software" not in image.info  # matplotlib's would carry its URL


def assert_panels_drawn(path: Path, panels: int) -> None:
    """The figure is `panels` panels of PANEL_SIZE side by side, each showing data: coloured
    pixels (axes, text and grid lines are grey; an empty panel has none, a model's 10 points
    about 400)."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)  # (H, W, 3)
    width, height = (round(side * DPI) for side in PANEL_SIZE)
    assert pixels.shape[:2] == (height, panels * width), path
    coloured = pixels.max(-1) - pixels.min(-1) > 60  # (H, W)
    for panel in range(panels):
        drawn = coloured[:, panel * width:(panel + 1) * width].sum()
        assert drawn > 100, f"{path}: panel {panel + 1} of {panels} shows no data ({drawn} px)"


def test_figures_stage_writes_offline_pngs(tmp_path):
    results = tmp_path / "results"
    write_results(results, "teacher", [98, 100, 96, 98, 94, 96, 92, 88, 84, 80], epochs=5)
    write_results(results, "baseline", [98, 98, 96, 94, 90, 86, 80, 60, 50, 40], epochs=5)
    write_results(results, "student", [100, 98, 98, 96, 94, 92, 88, 80, 74, 70], epochs=5)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "teachers": {"teacher": {"arch": "resnet20"}, "baseline": {"arch": "resnet8"}},
        "student": {"teacher": "teacher", "arch": "resnet8"}}))
    runner = CliRunner()
    assert runner.invoke(figures_stage, ["-h"]).exit_code == 0
    result = runner.invoke(figures_stage, ["--params", str(params), "--results", str(results),
                                           "--out", str(tmp_path / "figures")])
    assert result.exit_code == 0, result.output
    written = sorted((tmp_path / "figures").iterdir())
    assert [p.name for p in written] == ["per_class.png", "training_curves.png"]
    for path in written:
        assert_offline_png(path)
    with Image.open(written[0]) as image:  # three models + the reliability panel in a row
        assert image.size[0] > 3.5 * image.size[1]
    assert_panels_drawn(written[0], 4)
    assert_panels_drawn(written[1], 2)  # loss and top-1


def test_figures_stage_needs_results(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    result = CliRunner().invoke(figures_stage, ["--params", str(params), "--results",
                                                str(tmp_path), "--out", str(tmp_path / "f")])
    assert result.exit_code == 1
    assert "no NAME/per_class.csv for any model" in result.output


def test_per_class_plot_and_curves_read_what_the_stages_write(tmp_path):
    write_results(tmp_path, "m", [float("nan")] + [90.0] * 9, epochs=3)
    table = read_per_class(tmp_path / "m/per_class.csv", "m (resnet8)")
    assert table.train_counts == TRAIN_COUNTS and table.top1[1:] == [90.0] * 9
    assert read_curve(tmp_path / "m/train", "val/top1") == ([1, 2, 3], [50.0, 51.0, 52.0])
    assert read_curve(tmp_path / "m/train", "val/top5") == ([], [])
    plot_per_class([table], EvaluateParams(), tmp_path / "one.png")  # NaN class: no crash
    assert_offline_png(tmp_path / "one.png")


def test_reliability_reads_the_non_empty_bins(tmp_path):
    write_results(tmp_path, "m", [80.0] * 10, epochs=1)
    curve = read_reliability(tmp_path / "m/reliability.csv", "m (resnet8)")
    assert curve.count == [10 * m for m in range(4, 15)]
    assert curve.confidence == [(m + 0.5) / 15 for m in range(4, 15)]
    assert curve.accuracy == [0.8 * m / 15 for m in range(4, 15)]


def test_a_model_without_a_training_curve_keeps_one_colour_per_model(tmp_path, monkeypatch):
    # teacher: weights used as they are (epochs 0): a val/top1 point but no train/loss curve.
    write_results(tmp_path, "teacher", [90.0] * 10, epochs=1)
    (tmp_path / "teacher/train/plots/metrics/train/loss.tsv").unlink()
    write_results(tmp_path, "baseline", [80.0] * 10, epochs=3)
    write_results(tmp_path, "student", [85.0] * 10, epochs=3)
    figures = []
    monkeypatch.setattr(tools.plots, "_save", lambda figure, out: figures.append(figure))
    plot_training_curves({name: tmp_path / name / "train"
                          for name in ("teacher", "baseline", "student")}, tmp_path / "c.png")
    loss_ax, top1_ax = figures[0].axes
    colours = [{line.get_label(): line.get_color() for line in ax.lines}
               for ax in (loss_ax, top1_ax)]
    assert set(colours[0]) == {"baseline", "student"} and len(colours[1]) == 3
    assert all(colours[1][name] == colour for name, colour in colours[0].items())
    assert len(set(colours[1].values())) == 3


def test_dvc_yaml_declares_every_png_as_an_uncached_plot():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    pngs = {}
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path, options = next(iter(entry.items())) if isinstance(entry, dict) else (
                    entry, {})
                if path.endswith(".png"):
                    pngs[path] = (kind, options.get("cache"))
                    assert f"--plot {path}" in stage["cmd"] or "--out figures" in stage["cmd"]
    assert pngs == {"results/${key}/per_class.png": ("plots", False),
                    "results/student/per_class.png": ("plots", False),
                    "figures/per_class.png": ("plots", False),
                    "figures/training_curves.png": ("plots", False)}


def declared_pngs(teachers: list[str]) -> set[str]:
    """The PNG paths dvc.yaml declares, its foreach stages expanded over `teachers`."""
    paths = set()
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        keys = [None]
        if "foreach" in stage:
            assert stage["foreach"] == "${teachers}"
            stage, keys = stage["do"], teachers
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                if path.endswith(".png"):
                    paths |= {path.replace("${key}", key or "") for key in keys}
    return paths


def test_committed_figures_are_the_recorded_runs_and_open_offline():
    """The PNGs committed with the results (written by `dvc repro`): every one dvc.yaml declares
    for params.yaml's models is there, byte for byte the file dvc.lock records (not a stale one),
    opens offline, and shows one drawn panel per model (+ the reliability panel)."""
    teachers = list(yaml.safe_load((REPO / "params.yaml").read_text())["teachers"])
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    recorded = {out["path"]: out["md5"] for stage in lock.values()
                for out in stage.get("outs", []) if out["path"].endswith(".png")}
    assert set(recorded) == declared_pngs(teachers)
    assert len(recorded) == len(teachers) + 1 + 2  # each model's per_class.png + the figures
    for name, md5 in sorted(recorded.items()):
        path = REPO / name
        assert path.is_file(), f"{name}: missing; run `dvc repro` and commit what it writes"
        assert hashlib.md5(path.read_bytes()).hexdigest() == md5, (
            f"{name}: not the file dvc.lock records; commit the PNG with its dvc.lock")
        assert_offline_png(path)
    for model in (*teachers, "student"):
        assert_panels_drawn(REPO / f"results/{model}/per_class.png", 2)  # + reliability
    assert_panels_drawn(REPO / "figures/per_class.png", len(teachers) + 2)
    assert_panels_drawn(REPO / "figures/training_curves.png", 2)
