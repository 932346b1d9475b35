"""Data sources: each turns its input into lists of `Item`s per split, ready to encode.

A source only lists images and labels (cheap, in this process); `encode_item` reads, checks and
encodes one image and runs in worker processes (see pipeline/shards.py). Train items are
shuffled once with the params seed, so every WebDataset shard holds a mix of classes.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import UserError
from pipeline.params import DataParams

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class SourceError(UserError):
    """Bad source input (missing file, bad list line, bad label); the message says what to do."""


@dataclass(frozen=True)
class Item:
    """One image to encode: `path` is what the manifest records; the pixels come from `file`
    (an image file on disk) or `pixels` (an in-memory (H, W, 3) uint8 array)."""

    path: str
    label: int
    file: str | None = None
    pixels: np.ndarray | None = None


@dataclass(frozen=True)
class SourceData:
    class_names: list[str]
    splits: dict[str, list[Item]]  # "train", optionally "val", and "test"


@dataclass(frozen=True)
class Encoded:
    data: bytes
    extension: str  # "png" or "jpg"
    width: int  # of the original image
    height: int
    stored_side: int  # the longer side of the image as stored (after any re-encode)


def long_tail_counts(max_count: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """Exponential profile n_i = n_max * rho^(-i / (C - 1)), rounded down (as in CIFAR-LT)."""
    if num_classes == 1:
        return [max_count]
    return [int(max_count * imbalance_ratio ** (-i / (num_classes - 1)))
            for i in range(num_classes)]


def load_source(params: DataParams, seed: int) -> SourceData:
    """Dispatch on `params.source`; train items come back shuffled with `seed`."""
    loaders = {"digits_lt": _digits_lt, "split_lists": _split_lists, "cifar10_lt": _cifar_lt,
               "cifar100_lt": _cifar_lt, "image_folder": _image_folder}
    loaders["glyphs_lt"] = _glyphs_lt
    rng = np.random.default_rng(seed)
    data = loaders[params.source](params, rng)
    train = data.splits["train"]
    data.splits["train"] = [train[i] for i in rng.permutation(len(train))]
    return data


# ---------------------------------------------------------------------------------------------
# Sources

def _digits_lt(params: DataParams, rng: np.random.Generator) -> SourceData:
    """scikit-learn's bundled 8x8 digits: balanced val/test, long-tailed train, upscaled RGB."""
    from sklearn.datasets import load_digits  # shipped inside scikit-learn: nothing downloaded

    digits = load_digits()
    images = np.asarray(digits.images)  # (N, 8, 8) float64 in [0, 16]
    labels = np.asarray(digits.target)
    names = [str(name) for name in digits.target_names]

    def item(index: int) -> Item:
        gray = Image.fromarray(np.round(images[index] * (255 / 16)).astype(np.uint8))
        big = gray.resize((params.image_size, params.image_size), Image.Resampling.BILINEAR)
        rgb = np.repeat(np.asarray(big)[:, :, None], 3, axis=2)
        return Item(path=f"sklearn-digits/{index}", label=int(labels[index]), pixels=rgb)

    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(len(names))]
    return _balanced_holdout_and_long_tail(by_class, names, params, item, balanced=True)


def _glyphs_lt(params: DataParams, rng: np.random.Generator) -> SourceData:
    """Characters rendered from matplotlib's bundled fonts (pipeline/glyphs.py), every sample
    keyed by the params seed (the entropy `rng` was made from)."""
    from pipeline.glyphs import glyphs_lt

    return glyphs_lt(params, seed=rng.bit_generator.seed_seq.entropy)


def _image_folder(params: DataParams, rng: np.random.Generator) -> SourceData:
    """`root/class_name/image.ext`: balanced val/test held out per class, long-tailed train."""
    root = _existing_dir(params.root, "data.root (an ImageFolder tree root/class/image.jpg)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise SourceError(f"{root}: no class folders; expected root/class_name/image.jpg")
    files = [sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
             for d in class_dirs]
    names = [d.name for d in class_dirs]

    def item(index: int) -> Item:
        file = all_files[index]
        return Item(path=str(file.relative_to(root)), label=all_labels[index], file=str(file))

    all_files = [f for class_files in files for f in class_files]
    all_labels = [label for label, class_files in enumerate(files) for _ in class_files]
    starts = np.cumsum([0] + [len(f) for f in files])
    by_class = [rng.permutation(np.arange(starts[c], starts[c + 1])) for c in range(len(names))]
    return _balanced_holdout_and_long_tail(by_class, names, params, item, balanced=False)


def _balanced_holdout_and_long_tail(by_class, names, params: DataParams, make_item,
                                    *, balanced: bool):
    """Per class: the first val_per_class shuffled indices go to val, the next test_per_class
    to test; train keeps n_i of the rest, with n_max = the smallest class's rest when the
    source is `balanced` (digits), so every class can meet the profile exactly, else the
    largest class's rest (classes with fewer images keep what they have)."""
    held_out = params.val_per_class + params.test_per_class
    for name, indices in zip(names, by_class):
        if len(indices) <= held_out:
            raise SourceError(f"class {name!r} has {len(indices)} images; it needs more than "
                              f"data.val_per_class + data.test_per_class = {held_out}")
    rest = [indices[held_out:] for indices in by_class]
    max_count = min(len(r) for r in rest) if balanced else max(len(r) for r in rest)
    counts = long_tail_counts(max_count, len(names), params.imbalance_ratio)
    splits = {
        "train": [make_item(i) for r, n in zip(rest, counts) for i in r[:n]],
        "val": [make_item(i) for idx in by_class for i in idx[:params.val_per_class]],
        "test": [make_item(i) for idx in by_class for i in idx[params.val_per_class:held_out]],
    }
    if not splits["val"]:
        del splits["val"]
    return SourceData(class_names=names, splits=splits)


def _cifar_lt(params: DataParams, rng: np.random.Generator) -> SourceData:
    """CIFAR-10/100 python archive: long-tailed train (n_max = 5000 / 500), the full balanced
    test set. Read directly from the pickles: torchvision's reader refuses any archive whose
    md5 differs from the official one, which rules out generated test archives."""
    variant = "cifar-10-batches-py" if params.source == "cifar10_lt" else "cifar-100-python"
    files = _cifar_files(params.root, variant)
    label_key = b"labels" if variant == "cifar-10-batches-py" else b"fine_labels"
    names_key = b"label_names" if variant == "cifar-10-batches-py" else b"fine_label_names"
    train_parts = ([f"data_batch_{i}" for i in range(1, 6)]
                   if variant == "cifar-10-batches-py" else ["train"])
    meta_name = "batches.meta" if variant == "cifar-10-batches-py" else "meta"
    test_name = "test_batch" if variant == "cifar-10-batches-py" else "test"

    def batch(name: str) -> dict:
        if name not in files:
            raise SourceError(f"{params.root}: not a {variant} archive (no {name}); point "
                              "data.root at the CIFAR python archive or its extracted folder")
        try:
            return pickle.loads(files[name], encoding="bytes")
        except Exception as error:  # any unpickling failure means the same thing here
            raise SourceError(f"{params.root}: {name} is not a CIFAR pickle ({error})") from None

    names = [n.decode() for n in batch(meta_name)[names_key]]

    def items(parts: list[str], split: str) -> tuple[np.ndarray, list[int]]:
        loaded = [batch(p) for p in parts]
        try:
            pixels = np.concatenate([b[b"data"] for b in loaded]).reshape(-1, 3, 32, 32)
            labels = [int(label) for b in loaded for label in b[label_key]]
        except (KeyError, ValueError) as error:
            raise SourceError(f"{params.root}: malformed {split} batch ({error})") from None
        _check_labels(labels, len(names), f"{variant} {split}")
        return pixels.transpose(0, 2, 3, 1), labels

    train_pixels, train_labels = items(train_parts, "train")
    test_pixels, test_labels = items([test_name], "test")
    labels = np.asarray(train_labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(len(names))]
    counts = long_tail_counts(max(len(i) for i in by_class), len(names), params.imbalance_ratio)
    train = [Item(f"{variant}/train/{i}", train_labels[i], pixels=train_pixels[i])
             for indices, n in zip(by_class, counts) for i in indices[:n]]
    test = [Item(f"{variant}/test/{i}", label, pixels=test_pixels[i])
            for i, label in enumerate(test_labels)]
    return SourceData(class_names=names, splits={"train": train, "test": test})


def _cifar_files(root: str, variant: str) -> dict[str, bytes]:
    """The archive's files by base name, from a .tar.gz or a folder (holding `variant`/)."""
    path = Path(root)
    if path.is_file():
        try:
            with tarfile.open(path) as archive:
                return {Path(m.name).name: archive.extractfile(m).read()
                        for m in archive.getmembers() if m.isfile()}
        except tarfile.TarError as error:
            raise SourceError(f"{path}: not a CIFAR python archive ({error})") from None
    folder = _existing_dir(root, f"data.root (the CIFAR archive or the folder holding {variant})")
    if (folder / variant).is_dir():
        folder = folder / variant
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}


def _split_lists(params: DataParams, rng: np.random.Generator) -> SourceData:
    """ImageNet-LT / iNaturalist-18 / Places-LT lists: `relative/path label` per line."""
    root = _existing_dir(params.root, "data.root (the folder the list paths are relative to)")
    lists = {"train": params.train_list, "val": params.val_list, "test": params.test_list}
    if not params.train_list or not params.test_list:
        raise SourceError("data.train_list and data.test_list are required for split_lists")
    parsed = {split: _read_list(Path(file)) for split, file in lists.items() if file}
    num_classes = params.num_classes or 1 + max(label for _, label, _ in parsed["train"])
    for split, entries in parsed.items():
        for path, label, where in entries:
            if not 0 <= label < num_classes:
                raise SourceError(f"{where}: label {label} is outside 0..{num_classes - 1} "
                                  "(set data.num_classes or fix the list)")
    train_counts = Counter(label for _, label, _ in parsed["train"])
    missing = [c for c in range(num_classes) if not train_counts[c]]
    if missing:
        raise SourceError(f"{params.train_list}: class {missing[0]} has no train images "
                          f"({len(missing)} classes have none); every class needs one")
    splits = {split: [Item(path, label, file=str(root / path)) for path, label, _ in entries]
              for split, entries in parsed.items()}
    return SourceData(class_names=_names_from_folders(parsed["train"], num_classes),
                      splits=splits)


def _read_list(file: Path) -> list[tuple[str, int, str]]:
    """(relative path, label, 'file:line') for each non-empty line."""
    if not file.is_file():
        raise SourceError(f"{file}: split list not found; check data.*_list in params.yaml")
    entries = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise SourceError(f"{file}:{number}: expected 'relative/path label', got {line!r}")
        entries.append((parts[0], int(parts[1]), f"{file}:{number}"))
    return entries


def _names_from_folders(entries, num_classes: int) -> list[str]:
    """A class's name is its images' folder name (ImageNet's wnid) when they all share one."""
    folders: dict[int, set[str]] = {}
    for path, label, _ in entries:
        folders.setdefault(label, set()).add(Path(path).parent.name)
    return [next(iter(folders[c])) if len(folders[c]) == 1 and next(iter(folders[c]))
            else str(c) for c in range(num_classes)]


def _check_labels(labels: list[int], num_classes: int, where: str) -> None:
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise SourceError(f"{where}: label {bad[0]} is outside 0..{num_classes - 1}")


def _existing_dir(path: str, what: str) -> Path:
    if not path:
        raise SourceError(f"{what} is not set in params.yaml")
    if not Path(path).is_dir():
        raise SourceError(f"{path}: folder not found; check {what}")
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Encoding (runs in worker processes)

def encode_item(item: Item, max_side: int, jpeg_quality: int) -> Encoded | str:
    """Read, check and encode one image; a string says why it could not be read."""
    if item.pixels is not None:  # in-memory sources are small: lossless PNG
        image = Image.fromarray(item.pixels)
        return Encoded(_png(image), "png", image.width, image.height, max(image.size))
    try:
        data = Path(item.file).read_bytes()
        image = Image.open(io.BytesIO(data))
        image.load()  # decode fully: a truncated file fails here, not in training
    except FileNotFoundError:
        return f"{item.file}: image not found"
    except UnidentifiedImageError:
        return f"{item.file}: cannot decode image (not an image format PIL reads)"
    except Exception as error:  # PIL raises many types for corrupt data
        return f"{item.file}: cannot decode image ({error})"
    width, height = image.size
    if max_side and max(width, height) > max_side:
        scale = max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=jpeg_quality)
        return Encoded(buffer.getvalue(), "jpg", width, height, max(size))
    side = max(width, height)
    if image.format == "JPEG":
        return Encoded(data, "jpg", width, height, side)
    if image.format == "PNG":
        return Encoded(data, "png", width, height, side)
    return Encoded(_png(image.convert("RGB")), "png", width, height, side)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
