"""Tiny generated data sets in the formats the sources read."""

import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image


def save_image(path, rng, size=(20, 16), fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


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
