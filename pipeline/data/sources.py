"""Data sources: each turns its input into lists of `Item`s per split, ready to encode.

Which sources there are, and their class counts, is pipeline/data/registry.py; each entry names
its loader here (`load_source` dispatches on it; CIFAR's is in pipeline/data/cifar.py). A source
only lists images and labels (cheap, in this process); `encode_item` reads, checks and encodes
one image and runs in worker processes (see pipeline/data/shards.py). Train items are shuffled
once with the params seed, so every WebDataset shard holds a mix of classes.
"""

from __future__ import annotations

import codecs
import io
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.cifar import cifar_lt
from pipeline.data.images import is_plain, viewer_rgb
from pipeline.data.items import Item, SourceData, SourceError, existing_dir, long_tail_counts
from pipeline.data.registry import DATA_SOURCES
from pipeline.params import DataParams

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Folders and files that operating systems and tools leave in data trees (besides any name
# starting with '.': .DS_Store, AppleDouble ._*, .ipynb_checkpoints, .git, ...): never data.
OS_LITTER = ("__macosx", "thumbs.db", "desktop.ini", "@eadir")


@dataclass(frozen=True)
class Encoded:
    data: bytes
    extension: str  # "png" or "jpg"
    width: int  # of the original image
    height: int
    stored_side: int  # the longer side of the image as stored (after any re-encode)


def load_source(params: DataParams, seed: int) -> SourceData:
    """The source `params.source` names, by the loader its registry entry names (one of the
    functions below, or cifar_lt); train items come back shuffled with `seed`."""
    loader = LOADERS[DATA_SOURCES[params.source].loader]
    rng = np.random.default_rng(seed)
    data = loader(params, rng)
    train = data.splits["train"]
    data.splits["train"] = [train[i] for i in rng.permutation(len(train))]
    return data


# ---------------------------------------------------------------------------------------------
# Sources

def digits_lt(params: DataParams, rng: np.random.Generator) -> SourceData:
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


def glyphs_lt(params: DataParams, rng: np.random.Generator) -> SourceData:
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


def image_folder(params: DataParams, rng: np.random.Generator) -> SourceData:
    """`root/class_name/image.ext`: balanced val/test held out per class, long-tailed train.
    Hidden entries and OS litter (`is_litter`), files that are not images and links that would
    loop are left out at any depth and recorded (`ignored`). Links are followed wherever they
    point, to files and folders alike (a link to a folder above it is a loop: left out).
    Names are read as UTF-8 whatever the locale, and sorted as text: the same tree gives the
    same classes, labels and fingerprint under any LANG / LC_ALL."""
    root = existing_dir(params.root, "data.root (an ImageFolder tree root/class/image.jpg)")
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


def split_lists(params: DataParams, rng: np.random.Generator) -> SourceData:
    """ImageNet-LT / iNaturalist-18 / Places-LT lists: `relative/path label` per line."""
    root = existing_dir(params.root, "data.root (the folder the list paths are relative to)")
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


# The functions DATA_SOURCES' entries name, by those names.
LOADERS = {"digits_lt": digits_lt, "glyphs_lt": glyphs_lt, "image_folder": image_folder,
           "split_lists": split_lists, "cifar_lt": cifar_lt}


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
