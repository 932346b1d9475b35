"""The shared fixtures: the tiny world of helpers (a prepared data set, a trained teacher, a
real stage one, an S3 server), each built once per test module that asks for it, and tiny data
sets in the formats the sources read."""

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (NUM_SHARDS, TRAIN_ROWS, StageOneData, digits_params, image_folder_raw_params,
                     make_image_folder, params_from, prepare_digits, save_image)
from helpers.s3 import s3_server
from pipeline.data.shards import prepare_shards


@pytest.fixture(scope="module")
def stage_one_data(tmp_path_factory) -> StageOneData:
    """The image folder prepared into shards (26 train rows in 4 shards), and its params."""
    root = tmp_path_factory.mktemp("stage_one")
    make_image_folder(root / "images")
    raw = image_folder_raw_params(root / "images")
    params = params_from(raw)
    manifest = prepare_shards(params.data, params.seed, root / "shards")
    assert manifest["splits"]["train"]["rows"] == TRAIN_ROWS
    assert len(manifest["splits"]["train"]["shards"]) == NUM_SHARDS
    return StageOneData(root, raw, params, root / "shards", manifest)


@pytest.fixture(scope="module")
def teacher_checkpoint(stage_one_data) -> Path:
    """checkpoint.pt of the image folder's teacher (2 epochs of CE)."""
    from pipeline.train.runs import train_teacher

    out = stage_one_data.root / "teacher"
    torch.manual_seed(0)
    train_teacher(stage_one_data.params, "teacher", str(stage_one_data.shards_dir), str(out),
                  str(stage_one_data.root / "teacher_live"))
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def digits_stage_one(tmp_path_factory):
    """(shards_dir, manifest, teacher checkpoint, store path) of a real stage one on the digits:
    prepare, a 1-epoch resnet8 teacher, dump_logits with k = C = 10 at the student's size."""
    from pipeline.store.dump import dump_logits
    from pipeline.train.loop import CHECKPOINT
    from pipeline.train.runs import train_teacher

    root = tmp_path_factory.mktemp("stage_one")
    shards_dir, params = str(root / "shards"), digits_params()
    manifest = prepare_digits(shards_dir)
    train_teacher(params, "teacher", shards_dir, str(root / "teacher"), str(root / "live"))
    checkpoint = str(root / "teacher" / CHECKPOINT)
    store_path = str(root / "teacher.zarr")
    dump_logits(params, "teacher", shards_dir, checkpoint, store_path)
    return shards_dir, manifest, checkpoint, store_path


@pytest.fixture(scope="module")
def s3():
    """A real S3 API on 127.0.0.1 (helpers.s3) with a fresh bucket, for the module."""
    with s3_server() as server:
        yield server


@pytest.fixture
def imagenet_lt_tree(tmp_path):
    """An ImageNet-LT-format root with train/val/test lists: 3 classes, train 6/3/2."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet"
    lists = {}
    for split, counts in (("train", [6, 3, 2]), ("val", [1, 1, 1]), ("test", [2, 2, 2])):
        lines = []
        for label, count in enumerate(counts):
            for i in range(count):
                relative = f"{split}/n0000{label}/n0000{label}_{i}.JPEG"
                save_image(root / relative, rng, size=(30 + 7 * i, 20 + label))
                lines.append(f"{relative} {label}")
        lists[split] = tmp_path / f"ImageNet_LT_{split}.txt"
        lists[split].write_text("\n".join(lines) + "\n")
    return root, lists


@pytest.fixture
def cifar10_folder(tmp_path):
    """A CIFAR-10 python archive folder: 5 train batches of 40 (80 per class of... 10
    classes x 20 each), a test batch of 50."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"class{c}" for c in range(10)]

    def dump(name, count):
        labels = [int(i % 10) for i in range(count)]
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels}))

    for i in range(1, 6):
        dump(f"data_batch_{i}", 40)
    dump("test_batch", 50)
    (folder / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": [n.encode() for n in names]}))
    return folder


@pytest.fixture
def cifar10_tarball(cifar10_folder, tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        archive.add(cifar10_folder, arcname="cifar-10-batches-py")
    return path
