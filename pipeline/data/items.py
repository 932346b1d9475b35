"""What every data source returns: its train / val / test `Item`s and class names
(`SourceData`), the one error a bad source input raises, and the pieces the sources share
(the long-tail profile, the check of a folder named in params.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import UserError


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


def long_tail_counts(max_count: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """Exponential profile n_i = n_max * rho^(-i / (C - 1)), rounded down (as in CIFAR-LT)."""
    if num_classes == 1:
        return [max_count]
    return [int(max_count * imbalance_ratio ** (-i / (num_classes - 1)))
            for i in range(num_classes)]


def existing_dir(path: str, what: str) -> Path:
    """The folder `path`, which params key `what` names; SourceError when unset or absent."""
    if not path:
        raise SourceError(f"{what} is not set in params.yaml")
    if not Path(path).is_dir():
        raise SourceError(f"{path}: folder not found; check {what}")
    return Path(path)
