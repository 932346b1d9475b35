"""The user's data is a dependency of `prepare` (dvc.yaml templates `data.root` and the split
lists from params.yaml): an image added to an ImageFolder, or a split list edited, makes
`dvc status` report `prepare` as changed and `dvc repro` rebuild the shards.

A throwaway DVC project holds the repository's dvc.yaml, stages/ and pipeline/; only `prepare`
runs (one stage process per `dvc repro`)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from helpers import image_folder_raw_params, make_image_folder

REPO = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
UNUSED = "data/embedded.md"  # what a key names when the source reads no such file


def dvc_project(work: Path, data: dict) -> Path:
    """A git + DVC project in `work` with the repository's pipeline and `data` as params'
    data section."""
    for folder in ("pipeline", "stages"):
        shutil.copytree(REPO / folder, work / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (work / "data").mkdir()
    for name in ("dvc.yaml", UNUSED, "data/.gitignore"):
        shutil.copy2(REPO / name, work / name)
    raw = image_folder_raw_params("unused")
    raw["data"] = {**raw["data"], **data}
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for command in (["git", "init", "-q"], [*DVC, "init", "-q"]):
        subprocess.run(command, cwd=work, check=True, capture_output=True)
    return work


def dvc(work: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(work),  # the stage imports the project's copy
           "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(work / ".dvc-site"),
           "DVC_GLOBAL_CONFIG_DIR": str(work / ".dvc-global")}
    result = subprocess.run([*DVC, *args], cwd=work, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def fingerprint(work: Path) -> str:
    return json.loads((work / "data/shards/manifest.json").read_text())["fingerprint"]


def test_an_image_added_to_an_image_folder_reruns_prepare(tmp_path):
    work = dvc_project(tmp_path, {"root": "images", **{f"{split}_list": UNUSED for split in (
        "train", "val", "test")}})
    make_image_folder(work / "images")
    assert "Running stage 'prepare'" in dvc(work, "repro", "prepare")
    before = fingerprint(work)
    assert "up to date" in dvc(work, "status", "prepare")

    pixels = np.random.default_rng(5).integers(0, 256, (12, 9, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(work / "images" / "cow" / "new.png")
    status = dvc(work, "status", "prepare")
    assert "prepare:" in status and "changed deps" in status and "images" in status, status
    assert "Running stage 'prepare'" in dvc(work, "repro", "prepare")
    assert fingerprint(work) != before  # the shards were rebuilt with the new image
    assert "up to date" in dvc(work, "status", "prepare")


def test_an_edited_split_list_reruns_prepare(tmp_path, imagenet_lt_tree):
    root, lists = imagenet_lt_tree
    work = dvc_project(tmp_path / "project", {
        "source": "split_lists", "root": str(root), "val_per_class": 0,
        **{f"{split}_list": str(path) for split, path in lists.items()}})
    dvc(work, "repro", "prepare")
    assert "up to date" in dvc(work, "status", "prepare")
    train = lists["train"].read_text().splitlines()
    lists["train"].write_text("\n".join(train[:-1]) + "\n")  # one train image removed
    status = dvc(work, "status", "prepare")
    assert "changed deps" in status and lists["train"].name in status, status
