"""The `cifar10_lt` and `cifar100_lt` sources: CIFAR's python archive (a .tar.gz or its extracted
folder) read directly and safely: its pickles may hold plain data and numpy arrays only, and
anything malformed is a one-line SourceError naming the file and the entry."""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.items import Item, SourceData, SourceError, existing_dir, long_tail_counts
from pipeline.params import DataParams


def cifar_lt(params: DataParams, rng: np.random.Generator) -> SourceData:
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
    folder = existing_dir(root, f"data.root (the CIFAR archive or the folder holding {variant})")
    if (folder / variant).is_dir():
        folder = folder / variant
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}


def _check_labels(labels: list[int], num_classes: int, where: str) -> None:
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise SourceError(f"{where}: label {bad[0]} is outside 0..{num_classes - 1}")
