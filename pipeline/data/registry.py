"""The data sources `data.source` may name, each once: the params check a name and its class
count against this table before any work (pipeline/params.py), prepare loads a source with the
function its entry names (`pipeline.data.sources.load_source`).

It imports nothing on purpose: every stage imports the params, which import this table, and DVC
reruns a stage when a module it imports changes; the loaders (numpy, PIL, the CIFAR reader)
stay out of the training stages' dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataSource:
    """One value of `data.source`."""

    loader: str  # its function in pipeline/data/sources.py: (DataParams, rng) -> SourceData
    # The classes the source always has; 0: known from `data.num_classes` where the source
    # reads it (`takes_num_classes`) and it is set, else only after prepare (the manifest).
    num_classes: int = 0
    takes_num_classes: bool = False


# In the order `data.source`'s error message lists them.
DATA_SOURCES: dict[str, DataSource] = {
    "digits_lt": DataSource("digits_lt", num_classes=10),
    "split_lists": DataSource("split_lists", takes_num_classes=True),
    "cifar10_lt": DataSource("cifar_lt", num_classes=10),
    "cifar100_lt": DataSource("cifar_lt", num_classes=100),
    "image_folder": DataSource("image_folder"),
    "glyphs_lt": DataSource("glyphs_lt", num_classes=100),
}


def known_classes(source: str, num_classes: int) -> int:
    """The class count of `source` before prepare (`num_classes`: the `data.num_classes` key),
    or 0 when only the prepared data will tell."""
    entry = DATA_SOURCES[source]
    return entry.num_classes or (num_classes if entry.takes_num_classes else 0)
