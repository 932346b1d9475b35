"""Data sources: each turns its input into lists of `Item`s per split, ready to encode.

A source only lists images and labels (cheap, in this process); `encode_item` reads, checks and
encodes one image and runs in worker processes (see pipeline/data/shards.py). Train items are
shuffled once with the params seed, so every WebDataset shard holds a mix of classes.
"""

from __future__ import annotations

import codecs
import io
import math
import os
import pickle
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import UserError
from pipeline.data.images import is_plain, viewer_rgb
from pipeline.params import DataParams

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Folders and files that operating systems and tools leave in data trees (besides any name
# starting with '.': .DS_Store, AppleDouble ._*, .ipynb_checkpoints, .git, ...): never data.
OS_LITTER = ("__macosx", "thumbs.db", "desktop.ini", "@eadir")


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
    ignored: list[str] = field(default_factory=list)  # hidden entries and OS litter left out


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


def glyphs_split_counts(params: DataParams) -> dict[str, list[int]]:
    """glyphs_lt's images per class for each split: the exponential long-tail profile for train
    (n_max = glyphs.MAX_TRAIN_PER_CLASS, ratio data.imbalance_ratio: 100 in the preset, as
    CIFAR-100-LT), data.val_per_class and data.test_per_class for the balanced val and test
    splits. Cheap: nothing is rendered."""
    from pipeline.data import glyphs

    classes = len(glyphs.CHARACTERS)
    counts = {"train": long_tail_counts(glyphs.MAX_TRAIN_PER_CLASS, classes,
                                        params.imbalance_ratio),
              "val": [params.val_per_class] * classes,
              "test": [params.test_per_class] * classes}
    return {split: n for split, n in counts.items() if sum(n)}


def _glyphs_lt(params: DataParams, rng: np.random.Generator) -> SourceData:
    """Characters rendered from matplotlib's bundled fonts (pipeline/data/glyphs.py) at
    data.image_size, every sample keyed by the params seed (the entropy `rng` was made from).
    Item paths are `glyphs/SPLIT/LABEL/INDEX`; labels follow glyphs.CHARACTERS."""
    from pipeline.data import glyphs

    seed = rng.bit_generator.seed_seq.entropy
    splits = {}
    for split, counts in glyphs_split_counts(params).items():
        splits[split] = [
            Item(path=f"glyphs/{split}/{label}/{index}", label=label,
                 pixels=glyphs.render_glyph(character, params.image_size,
                                            glyphs.sample_rng(seed, split, label, index)))
            for label, (character, count) in enumerate(zip(glyphs.CHARACTERS, counts))
            for index in range(count)]
    return SourceData(class_names=list(glyphs.CHARACTERS), splits=splits)


def _image_folder(params: DataParams, rng: np.random.Generator) -> SourceData:
    """`root/class_name/image.ext`: balanced val/test held out per class, long-tailed train.
    Hidden entries and OS litter (`is_litter`), files that are not images and links that would
    loop are left out at any depth and recorded (`ignored`). Links are followed wherever they
    point, to files and folders alike (a link to a folder above it is a loop: left out).
    Names are read as UTF-8 whatever the locale, and sorted as text: the same tree gives the
    same classes, labels and fingerprint under any LANG / LC_ALL."""
    root = _existing_dir(params.root, "data.root (an ImageFolder tree root/class/image.jpg)")
    entries = sorted(root.iterdir(), key=lambda p: fs_text(p.name))
    ignored = [f"{fs_text(p.name)}/" if p.is_dir() else fs_text(p.name) for p in entries
               if is_litter(p.name)]
    class_dirs = [p for p in entries if p.is_dir() and not is_litter(p.name)]
    ignored += [f"{fs_text(p.name)} (not a folder: images go in root/class_name/)"
                for p in entries if not p.is_dir() and not is_litter(p.name)]
    if not class_dirs:
        raise SourceError(f"{root}: no class folders; expected root/class_name/image.jpg")
    files = [_image_files(d, root, ignored) for d in class_dirs]
    names = [fs_text(d.name) for d in class_dirs]

    def item(index: int) -> Item:
        file = all_files[index]
        return Item(path=fs_text(str(file.relative_to(root))), label=all_labels[index],
                    file=str(file))

    all_files = [f for class_files in files for f in class_files]
    all_labels = [label for label, class_files in enumerate(files) for _ in class_files]
    starts = np.cumsum([0] + [len(f) for f in files])
    by_class = [rng.permutation(np.arange(starts[c], starts[c + 1])) for c in range(len(names))]
    data = _balanced_holdout_and_long_tail(by_class, names, params, item, balanced=False)
    return SourceData(data.class_names, data.splits, ignored=ignored)


def fs_text(name: str) -> str:
    """A file name as UTF-8 text whatever the locale: under LC_ALL=C Python decodes names as
    ASCII with surrogate escapes ('caf\\udcc3\\udca9'); bytes that are not UTF-8 keep them."""
    return os.fsencode(name).decode("utf-8", "surrogateescape")


def is_litter(name: str) -> bool:
    """A hidden name (starting with '.') or one of the OS_LITTER names (any case)."""
    return name.startswith(".") or name.lower() in OS_LITTER


def _image_files(folder: Path, root: Path, ignored: list[str]) -> list[Path]:
    """The image files under `folder` (any depth, following links, sorted), skipping litter,
    files that are not images, broken links and links back to a folder above them; appends
    what it skips to `ignored`, relative to `root` (a folder once, with a '/')."""
    found = []

    def relative(path: Path) -> str:
        return fs_text(str(path.relative_to(root)))

    for parent, dirs, names in os.walk(folder, followlinks=True):
        here = Path(parent)
        real_here = os.path.realpath(here)
        ignored += [f"{relative(here / d)}/" for d in sorted(dirs, key=fs_text) if is_litter(d)]
        kept = []
        for name in sorted((d for d in dirs if not is_litter(d)), key=fs_text):
            target = os.path.realpath(here / name)
            if real_here == target or real_here.startswith(target + os.sep):
                ignored.append(f"{relative(here / name)}/ (a link to a folder above it: a loop)")
            else:
                kept.append(name)
        dirs[:] = kept  # os.walk descends only into these
        for name in sorted(names, key=fs_text):
            path = here / name
            if is_litter(name):
                ignored.append(relative(path))
            elif not path.exists():
                ignored.append(f"{relative(path)} (a broken link)")
            elif Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(path)
            else:
                ignored.append(f"{relative(path)} (not an image file)")
    return sorted(found, key=lambda path: fs_text(str(path)))


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
    cifar10 = params.source == "cifar10_lt"
    variant = "cifar-10-batches-py" if cifar10 else "cifar-100-python"
    archive = _CifarArchive(params.root, variant, _cifar_files(params.root, variant))
    names = archive.names("batches.meta" if cifar10 else "meta",
                          "label_names" if cifar10 else "fine_label_names")
    label_key = "labels" if cifar10 else "fine_labels"
    train_parts = [f"data_batch_{i}" for i in range(1, 6)] if cifar10 else ["train"]
    train_pixels, train_labels = archive.split(train_parts, label_key, len(names), "train")
    test_pixels, test_labels = archive.split(["test_batch" if cifar10 else "test"], label_key,
                                             len(names), "test")
    labels = np.asarray(train_labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(len(names))]
    counts = long_tail_counts(max(len(i) for i in by_class), len(names), params.imbalance_ratio)
    train = [Item(f"{variant}/train/{i}", train_labels[i], pixels=train_pixels[i])
             for indices, n in zip(by_class, counts) for i in indices[:n]]
    test = [Item(f"{variant}/test/{i}", label, pixels=test_pixels[i])
            for i, label in enumerate(test_labels)]
    return SourceData(class_names=names, splits={"train": train, "test": test})


@dataclass(frozen=True)
class _CifarArchive:
    """The pickled batches of a CIFAR python archive, checked as they are read: keys may be
    bytes (the official Python 2 pickles) or str (archives re-saved by Python 3); anything
    malformed is a one-line SourceError naming the file and the entry."""

    root: str
    variant: str
    files: dict[str, bytes]  # base name -> content

    def batch(self, name: str) -> dict:
        if name not in self.files:
            raise SourceError(f"{self.root}: not a {self.variant} archive (no {name}); point "
                              "data.root at the CIFAR python archive or its extracted folder")
        return _cifar_pickle(self.files[name], f"{self.root}: {name}")

    def entry(self, name: str, loaded: dict, key: str):
        if key not in loaded:
            raise SourceError(f"{self.root}: {name} has no {key!r} entry (it has "
                              f"{', '.join(map(str, loaded)) or 'none'}); not a "
                              f"{self.variant} archive")
        return loaded[key]

    def names(self, meta: str, key: str) -> list[str]:
        names = self.entry(meta, self.batch(meta), key)
        if not isinstance(names, (list, tuple)) or not all(
                isinstance(n, (bytes, str)) for n in names):
            raise SourceError(f"{self.root}: {meta}: {key} is not a list of names")
        return [n.decode() if isinstance(n, bytes) else n for n in names]

    def split(self, parts: list[str], label_key: str, num_classes: int,
              split: str) -> tuple[np.ndarray, list[int]]:
        """(N, 32, 32, 3) uint8 pixels and N labels of the batches `parts`."""
        pixels, labels = [], []
        for part in parts:
            loaded = self.batch(part)
            data = np.asarray(self.entry(part, loaded, "data"))  # (n, 3072): R, G, B planes
            if data.ndim != 2 or data.shape[1] != 3072 or data.dtype.kind not in "ui" or (
                    data.size and (data.min() < 0 or data.max() > 255)):
                raise SourceError(f"{self.root}: {part}: 'data' is {data.dtype} of shape "
                                  f"{data.shape}, expected uint8 rows of 3072 (3x32x32)")
            part_labels = self.entry(part, loaded, label_key)
            try:
                part_labels = [int(label) for label in part_labels]
            except (TypeError, ValueError):
                raise SourceError(f"{self.root}: {part}: {label_key} is not a list of "
                                  "integers") from None
            if len(part_labels) != len(data):
                raise SourceError(f"{self.root}: {part}: {len(part_labels)} labels for "
                                  f"{len(data)} images")
            pixels.append(data.astype(np.uint8))
            labels += part_labels
        _check_labels(labels, num_classes, f"{self.variant} {split}")
        return np.concatenate(pixels).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a CIFAR batch from the internet cannot run
    code (any other global is refused)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype")} | {
        (f"numpy.{core}.{module}", name) for core in ("core", "_core")
        for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                             ("numeric", "_frombuffer"))}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar_pickle(data: bytes, where: str) -> dict:
    """One CIFAR batch as a dict with str keys."""
    try:
        loaded = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as error:  # any unpickling failure means the same thing here
        raise SourceError(f"{where} is not a CIFAR pickle ({error})") from None
    if not isinstance(loaded, dict):
        raise SourceError(f"{where} is not a CIFAR pickle (a {type(loaded).__name__}, not a "
                          "dict)")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v
            for k, v in loaded.items()}


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
    """(relative path, label, 'file:line') for each non-blank line. Lists saved by other tools
    read the same: a UTF-8 or UTF-16 byte order mark, LF / CRLF / CR line ends, surrounding
    whitespace and blank lines are all accepted; the path may hold spaces (the label is the
    line's last field)."""
    if not file.is_file():
        raise SourceError(f"{file}: split list not found; check data.*_list in params.yaml")
    data = file.read_bytes()
    utf16 = data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    try:
        text = data.decode("utf-16" if utf16 else "utf-8-sig")  # either drops its BOM
    except UnicodeDecodeError as error:
        raise SourceError(f"{file}: not {'UTF-16' if utf16 else 'UTF-8'} text (byte "
                          f"{error.start}); save the list as UTF-8") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.strip().rsplit(maxsplit=1)
        if not parts:
            continue
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
    """Read, check and encode one image; a string says why it could not be read. The shard
    gets the file's own bytes when they already decode to what a viewer shows
    (pipeline.data.images.is_plain), else the viewer's 8-bit RGB picture as PNG; images larger
    than `max_side` are scaled down and stored as JPEG."""
    if item.pixels is not None:  # in-memory sources are small: lossless PNG
        image = Image.fromarray(item.pixels)
        return Encoded(_png(image), "png", image.width, image.height, max(image.size))
    try:
        data = Path(item.file).read_bytes()
        with warnings.catch_warnings():  # Pillow only warns between 1x and 2x its limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()  # decode fully: a truncated file fails here, not in training
        plain = is_plain(image)
        upright = image if plain else viewer_rgb(image)
    except FileNotFoundError:
        return f"{item.file}: image not found"
    except UnidentifiedImageError:
        return f"{item.file}: cannot decode image (not an image format PIL reads)"
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        side = math.isqrt(Image.MAX_IMAGE_PIXELS)
        return (f"{item.file}: more than {Image.MAX_IMAGE_PIXELS:,} pixels, the most an image "
                f"may have (Pillow's decompression-bomb limit, {side} x {side} px); scale it "
                "down before prepare")
    except Exception as error:  # PIL raises many types for corrupt data or odd modes
        return f"{item.file}: cannot decode image ({error})"
    width, height = upright.size
    if max_side and max(width, height) > max_side:
        scale = max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        upright = upright.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        upright.save(buffer, format="JPEG", quality=jpeg_quality)
        return Encoded(buffer.getvalue(), "jpg", width, height, max(size))
    side = max(width, height)
    if plain:
        return Encoded(data, "jpg" if image.format == "JPEG" else "png", width, height, side)
    return Encoded(_png(upright), "png", width, height, side)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
