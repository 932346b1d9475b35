"""The tests' one tiny world: one params builder (`toy_raw_params`: the params of every test that
runs a stage's work on data, with overrides) and the two tiny data sets it points at, plus what
tests share to build on them. (Tests of params parsing and of one source write their own few
keys: they test the file, not a run.)

- digits-LT at 16 px (`DIGITS`, the builder's default): the embedded data, 86 train rows of 10
  classes in shards of 16 (5 full and a short one of 6), nothing to generate on disk.
- an image folder of odd-sized PNGs (`make_image_folder`, `image_folder_raw_params`): 26 train
  rows of 3 classes in shards of 8, 8, 8 and 2; the images of a user's own folder.

Fixtures built on them (a prepared data set, a trained teacher, a real dump, an S3 server) live
in conftest.py; JPEG pictures in helpers.jpeg, hand-made logit stores in helpers.stores.
"""

import copy
import textwrap
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
import yaml
from PIL import Image

from pipeline.data.shards import prepare_shards
from pipeline.params import DataParams, Params, check_consistency, parse

SEED = 0
IMAGE_SIZE = 16  # every model's crop side, teachers' and students'
# resnet8 at 16 px for one epoch, in this process: the smallest model run the stages know
TRAIN = dict(arch="resnet8", image_size=IMAGE_SIZE, epochs=1, batch_size=32, workers=0)
# digits-LT at 16 px: 86 train rows (10 classes) in shards of 16, 20 val, 1500 test rows
DIGITS = dict(source="digits_lt", image_size=IMAGE_SIZE, val_per_class=2, test_per_class=150,
              shard_size=16, workers=0)
DIGITS_CLASSES = 10


def toy_raw_params(data: dict = DIGITS, *, train: dict | None = None, **changes) -> dict:
    """The toy params.yaml content, as plain data (ready for params_from or yaml.safe_dump).

    data: the data section (a data set: DIGITS, or image_folder_raw_params's); train: changes to
    every model's training section (teachers and student); every other keyword changes its
    section (`teacher=` the teacher's, `seed=3` the top-level value). The default: the teacher
    and an IKL student on every class's logit (k = C = 10), 2 views, one epoch each."""
    raw = {
        "seed": SEED,
        "data": dict(data),
        "teachers": {"teacher": dict(TRAIN)},
        "augment": {"crop_scale": [0.35, 1.0], "flip_probability": 0.5},
        "logits": {"views": 2, "topk": DIGITS_CLASSES, "tail": "quantized",
                   "image_size": IMAGE_SIZE, "batch_size": 64, "prior_temperatures": [1.0, 100.0]},
        "student": {**TRAIN, "teacher": "teacher", "loss": "ikl"},
        "evaluate": {"batch_size": 64},
    }
    for section in (*raw["teachers"].values(), raw["student"]):
        section.update(train or {})
    for key, value in changes.items():
        if isinstance(value, dict):
            target = raw["teachers"]["teacher"] if key == "teacher" else raw.setdefault(key, {})
            target.update(copy.deepcopy(value))
        else:
            raw[key] = value
    return copy.deepcopy(raw)  # nothing shared between sections: no YAML aliases either


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


def write_params_file(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def save_image(path, rng, size=(20, 16), fmt="JPEG"):
    """One random RGB picture of `size` (width, height) at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


# ---------------------------------------------------------------------------------------------
# digits-LT at 16 px

def digits_data_params(**changes) -> DataParams:
    """The DIGITS data section as DataParams, with `changes`."""
    return DataParams(**{**DIGITS, **changes})


def prepare_digits(out_dir, **changes) -> dict:
    """DIGITS (with `changes`) prepared into shards at out_dir; returns the manifest."""
    return prepare_shards(digits_data_params(**changes), SEED, out_dir)


def digits_params(logits: dict | None = None, **student) -> Params:
    """The default toy params; `student` changes the student section, `logits` the logits."""
    return params_from(toy_raw_params(logits=logits or {}, student=student))


# ---------------------------------------------------------------------------------------------
# The image folder: odd-sized PNGs, the stage-one toy data set

# Per class: 1 val + 1 test image, the rest train: 12 / 8 / 6 train rows after the long-tail
# cut (imbalance_ratio 2) = 26 rows, in shards of 8, 8, 8 and a short one of 2.
CLASS_IMAGES = {"ant": 14, "bee": 10, "cow": 8}
TRAIN_ROWS, SHARD_SIZE = 26, 8
NUM_SHARDS = 4


def image_folder_raw_params(root: str | Path) -> dict:
    """The toy params on the image folder at `root` (make_image_folder): a 2-epoch teacher
    with warm-up, batches that split a shard (8 rows, 5 in the dump)."""
    return toy_raw_params(
        dict(source="image_folder", root=str(root), imbalance_ratio=2.0, val_per_class=1,
             test_per_class=1, shard_size=SHARD_SIZE, workers=0),
        seed=3,
        train=dict(epochs=2, batch_size=8, lr=0.05, warmup_epochs=1),
        # flip_probability 0.5: flips are half of what the store has to replay
        augment=dict(crop_scale=[0.25, 1.0], crop_ratio=[0.75, 1.3333333]),
        # k < C with every other class's logit in the quantised tail (what IKL needs), the
        # teacher's own training size (the dump refuses another), batches that split a shard
        logits=dict(views=3, topk=2, batch_size=5, prior_temperatures=[1.0, 4.0]),
        student=dict(epochs=1),
        evaluate=dict(batch_size=16))


def make_image_folder(root: Path) -> None:
    """root/class/NN.png: random RGB images of varied, mostly non-square sizes (6..40 px)."""
    rng = np.random.default_rng(0)
    for name, count in CLASS_IMAGES.items():
        (root / name).mkdir(parents=True)
        for index in range(count):
            height, width = (int(v) for v in rng.integers(6, 41, 2))
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index:02d}.png")


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


# A dump stage in which the rank writing shard 2 dies halfway through it: part of its tail
# residuals land, then os._exit, like SIGKILL (no cleanup: its lock, on disk or on S3, stays).
KILLED_MID_SHARD_2 = textwrap.dedent("""
    import os, runpy, sys
    import pipeline.store.dump

    real_write_shard = pipeline.store.dump.write_shard

    def write_shard(group, shard_index, **arrays):
        if shard_index == 2:
            group["tail_residuals"][:, 16:24] = 7
            os._exit(17)
        real_write_shard(group, shard_index, **arrays)

    pipeline.store.dump.write_shard = write_shard
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
""")
