"""Shared stage-one fixtures: a tiny ImageFolder dataset of odd-sized images, prepared into
WebDataset shards, its toy params and a teacher trained on it.

Import the fixtures into a test module (`from helpers_stage_one import stage_one_data`); each
module then builds its own copy once (module scope).
"""

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image

from pipeline.params import Params, check_consistency, parse
from pipeline.data.shards import prepare_shards

# Per class: 1 val + 1 test image, the rest train: 12 / 8 / 6 train rows after the long-tail
# cut (imbalance_ratio 2) = 26 rows, in shards of 8, 8, 8 and a short one of 2.
CLASS_IMAGES = {"ant": 14, "bee": 10, "cow": 8}
TRAIN_ROWS, SHARD_SIZE = 26, 8
NUM_SHARDS = 4


def toy_raw_params(root: str | Path) -> dict:
    """The toy params.yaml content, as plain data (ready for parse() or yaml.safe_dump)."""
    train = dict(arch="resnet8", image_size=16, epochs=2, batch_size=8, lr=0.05,
                 warmup_epochs=1, workers=0)
    return {
        "seed": 3,
        "data": dict(source="image_folder", root=str(root), imbalance_ratio=2.0,
                     val_per_class=1, test_per_class=1, shard_size=SHARD_SIZE, workers=0),
        "teachers": {"teacher": train},
        # flip_probability 0.5: flips are half of what the store has to replay
        "augment": dict(crop_scale=[0.25, 1.0], crop_ratio=[0.75, 1.3333333],
                        flip_probability=0.5),
        # k < C with every other class's logit in the quantised tail (what IKL needs), the
        # teacher's own training size (the dump refuses another), batches that split a shard
        "logits": dict(views=3, topk=2, tail="quantized", image_size=16, batch_size=5,
                       prior_temperatures=[1.0, 4.0]),
        "student": dict(copy.deepcopy(train), teacher="teacher", loss="ikl", epochs=1),
        "evaluate": dict(batch_size=16),
    }


def params_from(raw: dict) -> Params:
    return check_consistency(parse(Params, raw, ""))


def with_changes(raw: dict, section: str, **changes) -> dict:
    """A deep copy of `raw` with `raw[section]` (dotted: "teachers.teacher"; "" is the top
    level) updated."""
    raw = copy.deepcopy(raw)
    node = raw
    for key in filter(None, section.split(".")):
        node = node[key]
    node.update(changes)
    return raw


def make_image_folder(root: Path) -> None:
    """root/class/NN.png: random RGB images of varied, mostly non-square sizes (6..40 px)."""
    rng = np.random.default_rng(0)
    for name, count in CLASS_IMAGES.items():
        (root / name).mkdir(parents=True)
        for index in range(count):
            height, width = (int(v) for v in rng.integers(6, 41, 2))
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index:02d}.png")


def write_params_file(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def train_samples(shards_dir: Path, manifest: dict) -> list[dict]:
    """Every train sample in row order: {row, label, height, width, image (3, H, W) uint8}."""
    from pipeline.stream.decode import decode
    from pipeline.stream.loader import split_shards

    samples = []
    for shard in split_shards(str(shards_dir), manifest, "train"):
        for sample in wds.WebDataset(shard.url, shardshuffle=False):
            meta = json.loads(sample["json"])
            samples.append({**meta, "image": decode(sample)})
    assert [s["row"] for s in samples] == list(range(manifest["splits"]["train"]["rows"]))
    return samples


@dataclass(frozen=True)
class StageOneData:
    root: Path  # scratch folder of the module
    raw: dict  # toy params as plain data
    params: Params
    shards_dir: Path
    manifest: dict


@pytest.fixture(scope="module")
def stage_one_data(tmp_path_factory) -> StageOneData:
    """The toy dataset prepared into shards (26 train rows in 4 shards), and its params."""
    root = tmp_path_factory.mktemp("stage_one")
    make_image_folder(root / "images")
    raw = toy_raw_params(root / "images")
    params = params_from(raw)
    manifest = prepare_shards(params.data, params.seed, root / "shards")
    assert manifest["splits"]["train"]["rows"] == TRAIN_ROWS
    assert len(manifest["splits"]["train"]["shards"]) == NUM_SHARDS
    return StageOneData(root, raw, params, root / "shards", manifest)


@pytest.fixture(scope="module")
def teacher_checkpoint(stage_one_data) -> Path:
    """checkpoint.pt of the toy teacher (2 epochs of CE)."""
    from pipeline.train.runs import train_teacher

    out = stage_one_data.root / "teacher"
    torch.manual_seed(0)
    train_teacher(stage_one_data.params, "teacher", str(stage_one_data.shards_dir), str(out),
                  str(stage_one_data.root / "teacher_live"))
    return out / "checkpoint.pt"
