"""Which crops a training run sees each epoch: a student replays its teacher's stored views
(`StoredViews`), a student with a live teacher or on plain CE draws the views a store would
hold (`CachedViews`), a teacher draws fresh ones no store holds (`FreshViews`). Each names the
epoch's view ids and the seed of the epoch's row order; pipeline.stream.augment draws the
crop of (seed, view, row)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.store.layout import MAX_VIEWS
from pipeline.stream.augment import CropSpec

# A teacher's crops (FreshViews) start here, past the at most MAX_VIEWS views a store caches,
# so that a teacher never trains on the very crops it later labels.
FRESH_VIEW_OFFSET = MAX_VIEWS


@dataclass(frozen=True)
class StoredViews:
    """A student's crops replayed from its teacher's logit store, with their boxes, flips and
    teacher logits: epoch e takes views e*m .. e*m+m-1 (m = views_per_decode crops per decoded
    image) modulo the store's V. The views' seed is the store's; `order_seed` orders the rows."""

    store: object  # a pipeline.store.LogitStore
    epoch: int
    order_seed: int
    views_per_decode: int = 1

    def view_ids(self) -> list[int]:
        return [v % self.store.views for v in _epoch_views(self.epoch, self.views_per_decode)]


@dataclass(frozen=True)
class CachedViews:
    """The crops a store of V = `views` would hold, drawn from (seed, view, row) as the dump
    draws them: a student with a live teacher, or on plain CE, sees what a cached one would.
    Epoch e takes views e*m .. e*m+m-1 modulo V; `order_seed` orders the rows."""

    seed: int
    epoch: int
    order_seed: int
    views: int
    views_per_decode: int = 1
    crop: CropSpec = CropSpec()
    store: ClassVar[None] = None  # drawn, not read (the loader tells the sources apart by it)

    def view_ids(self) -> list[int]:
        return [v % self.views for v in _epoch_views(self.epoch, self.views_per_decode)]


@dataclass(frozen=True)
class FreshViews:
    """A teacher's crops: views drawn from (seed, view, row) from FRESH_VIEW_OFFSET on, one new
    view per epoch, none of them in any store; `order_seed` orders the rows."""

    seed: int
    epoch: int
    order_seed: int
    views_per_decode: int = 1
    crop: CropSpec = CropSpec()
    store: ClassVar[None] = None

    def view_ids(self) -> list[int]:
        return [FRESH_VIEW_OFFSET + v for v in _epoch_views(self.epoch, self.views_per_decode)]


Views = StoredViews | CachedViews | FreshViews


def _epoch_views(epoch: int, views_per_decode: int) -> range:
    return range(epoch * views_per_decode, (epoch + 1) * views_per_decode)


def ViewSource(seed: int, epoch: int, views_per_decode: int = 1, crop: CropSpec = CropSpec(),
               store=None, cached_views: int = 0, shuffle_seed: int | None = None) -> Views:
    """The named source these arguments (the former single class's) describe: StoredViews with
    a store, CachedViews with `cached_views` = V, else FreshViews; `shuffle_seed` orders the
    rows (None: `seed`)."""
    order_seed = seed if shuffle_seed is None else shuffle_seed
    if store is not None:
        return StoredViews(store, epoch, order_seed, views_per_decode)
    if cached_views:
        return CachedViews(seed, epoch, order_seed, cached_views, views_per_decode, crop)
    return FreshViews(seed, epoch, order_seed, views_per_decode, crop)
