"""ImageFolder trees as users keep them (issue 21, issue 23 item 7): symbolic links (followed,
loops left out), files that are not images (listed), images above Pillow's pixel limit
(refused naming it), and non-ASCII names under a non-UTF-8 locale (the same data set, and
text files that do not depend on the locale)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.data.shards import prepare_shards
from pipeline.data.sources import SourceError
from pipeline.params import DataParams, Params, TrainParams
from pipeline.train.checkpoints import save_checkpoint
from pipeline.train.models import build_model
from pipeline.train.runs import model_identity
from stages.prepare import main as prepare_stage

REPO = Path(__file__).resolve().parents[1]
OPTIONS = dict(source="image_folder", val_per_class=0, test_per_class=1, imbalance_ratio=1,
               workers=0, shard_size=4)


def save_png(path: Path, seed: int, size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    Image.fromarray(pixels).save(path)


def tree(root: Path, classes=("a", "b"), count=4, extra=None) -> Path:
    """root/class/i.png, and `extra` (relative path -> seed) besides."""
    for c, name in enumerate(classes):
        for i in range(count):
            save_png(root / name / f"{i}.png", 10 * c + i)
    for relative, seed in (extra or {}).items():
        save_png(root / relative, seed)
    return root


def prepare(root: Path, out: Path, **options) -> dict:
    return prepare_shards(DataParams(root=str(root), **{**OPTIONS, **options}), 0, out)


# ---------------------------------------------------------------------------------------------
# Links

def test_linked_folders_and_files_are_read_as_if_they_were_there(tmp_path):
    """a/more -> a folder outside the root, b/x.png -> a file outside it: the same data set
    (counts, fingerprint) as a tree holding real copies."""
    extra = {"a/more/m0.png": 100, "a/more/m1.png": 101, "b/x.png": 102}
    copies = tree(tmp_path / "copies", extra=extra)
    linked = tree(tmp_path / "linked")
    elsewhere = tree(tmp_path / "elsewhere", classes=(), extra={
        "more/m0.png": 100, "more/m1.png": 101, "x.png": 102})
    os.symlink(elsewhere / "more", linked / "a" / "more")
    os.symlink(elsewhere / "x.png", linked / "b" / "x.png")
    expected = prepare(copies, tmp_path / "expected")
    manifest = prepare(linked, tmp_path / "shards")
    assert manifest["train_counts"] == expected["train_counts"] == [5, 4]
    assert manifest["fingerprint"] == expected["fingerprint"]
    assert manifest["ignored"] == expected["ignored"] == {"count": 0, "paths": []}


def test_link_loops_and_broken_links_are_left_out_and_listed(tmp_path):
    clean = tree(tmp_path / "clean")
    root = tree(tmp_path / "loops")
    os.symlink("..", root / "a" / "up")  # back to the root: a loop
    os.symlink(".", root / "b" / "self")
    os.symlink("nowhere.png", root / "b" / "broken.png")
    manifest = prepare(root, tmp_path / "shards")
    assert manifest["fingerprint"] == prepare(clean, tmp_path / "expected")["fingerprint"]
    assert manifest["ignored"]["paths"] == [
        "a/up/ (a link to a folder above it: a loop)",
        "b/self/ (a link to a folder above it: a loop)",
        "b/broken.png (a broken link)"]


# ---------------------------------------------------------------------------------------------
# Files that are not images

def test_files_that_are_not_images_are_listed_in_the_manifest_and_the_summary(tmp_path):
    root = tree(tmp_path / "folder")
    (root / "a" / "notes.txt").write_text("where these came from\n")
    (root / "b" / "labels.csv").write_text("x,y\n")
    (root / "README.md").write_text("# my data\n")
    (root / ".DS_Store").write_bytes(bytes(8))
    params = tmp_path / "params.yaml"
    params.write_text("data: " + json.dumps({**OPTIONS, "root": str(root)}) + "\n")
    result = CliRunner().invoke(prepare_stage, ["--params", str(params), "--out",
                                                str(tmp_path / "shards")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["ignored"] == {"count": 4, "paths": [
        ".DS_Store", "README.md (not a folder: images go in root/class_name/)",
        "a/notes.txt (not an image file)", "b/labels.csv (not an image file)"]}
    assert ("ignored 4 (hidden, OS litter, not images: the manifest's 'ignored' lists them)"
            in result.output)


# ---------------------------------------------------------------------------------------------
# Decompression bombs

@pytest.mark.parametrize("side", [40, 50])  # Pillow warns above its limit, fails above twice it
def test_an_image_above_the_pixel_limit_is_refused_naming_the_limit(tmp_path, monkeypatch,
                                                                    side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # as 12,000 x 12,000 is to 89.5 M
    root = tree(tmp_path / "folder")
    Image.new("RGB", (side, side), (9, 9, 9)).save(root / "a" / "huge.png")
    with pytest.raises(SourceError) as error:
        prepare(root, tmp_path / "shards")
    assert str(error.value) == (
        f"{root}/a/huge.png: more than 1,000 pixels, the most an image may have (Pillow's "
        "decompression-bomb limit, 31 x 31 px); scale it down before prepare (set "
        "data.skip_bad_images: true to skip and record such images)")
    manifest = prepare(root, tmp_path / "skipped", skip_bad_images=True)
    assert manifest["skipped"] == {"count": 1, "paths": ["a/huge.png"]}


# ---------------------------------------------------------------------------------------------
# Locales

NAMES = ("café", "naïve", "zebra", "Ωmega")  # sorted as text: café, naïve, zebra, Ωmega
C_LOCALE = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0",
            "PYTHONIOENCODING": "", "PYTHONPATH": str(REPO)}


def run_c_locale(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], env=C_LOCALE, cwd=REPO,
                            capture_output=True, text=True, encoding="utf-8",
                            errors="backslashreplace", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_a_non_utf8_locale_gives_the_same_data_set_and_readable_reports(tmp_path):
    """prepare under LC_ALL=C stores the same class names and fingerprint as under UTF-8;
    evaluate writes its per-class table (UTF-8) and plot; the figures stage reads it back."""
    root = tree(tmp_path / "folder", classes=NAMES, count=3)
    expected = prepare(root, tmp_path / "expected")
    assert expected["class_names"] == list(NAMES)
    out = tmp_path / "shards"
    printed = run_c_locale(
        "import sys; from pipeline.data.shards import prepare_shards; "
        "from pipeline.params import DataParams; "
        f"prepare_shards(DataParams(root={str(root)!r}, **{OPTIONS!r}), 0, {str(out)!r}); "
        "print(sys.getfilesystemencoding())")
    assert printed.split()[-1] == "ascii"  # the case: names decoded as ASCII by default
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["class_names"] == list(NAMES)
    assert manifest["fingerprint"] == expected["fingerprint"]

    checkpoint = tmp_path / "checkpoint.pt"
    settings = TrainParams(arch="resnet8", image_size=8)
    save_checkpoint(checkpoint, {"model": build_model("resnet8", len(NAMES)).state_dict(),
                                 "epoch": 0, **model_identity(settings, Params(), manifest)})
    params = tmp_path / "params.yaml"
    params.write_text("evaluate: {batch_size: 8, many_above: 2, few_below: 1}\n")
    table, plot = tmp_path / "per_class.csv", tmp_path / "per_class.png"
    run_c_locale(
        "import sys; from stages.evaluate import main; sys.argv = ['evaluate', '--params', "
        f"{str(params)!r}, '--shards', {str(out)!r}, '--checkpoint', {str(checkpoint)!r}, "
        f"'--metrics', {str(tmp_path / 'test.json')!r}, '--per-class', {str(table)!r}, "
        f"'--plot', {str(plot)!r}]; main(standalone_mode=False)")
    rows = table.read_text(encoding="utf-8").splitlines()
    assert [row.split(",")[1] for row in rows[1:]] == list(NAMES) and plot.is_file()
    read = run_c_locale("from pipeline.tools.plots import read_per_class; "
                        f"print(read_per_class({str(table)!r}, 'teacher').train_counts)")
    assert read.strip() == str(manifest["train_counts"])
