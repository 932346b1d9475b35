"""Streaming WebDataset shards into training and evaluation batches.

Training chain (one epoch): shard list -> seeded shard shuffle -> split by node (rank) ->
split by DataLoader worker -> tar samples -> attach each sample's crop (and, for a student,
its cached teacher logits, read once per shard) -> shuffle buffer -> decode once -> m crops ->
batch. The logits ride along with their own sample through the shuffle, so pairing cannot
drift; a store row whose label differs from the shard's stops the run.

A batch is a dict of tensors: `images` (B, 3, S, S) uint8, `labels` (B,) int64, `rows` (B,)
int64, and for a student `topk_logits` (B, k) float16, `topk_classes` (B, k) int64,
`logsumexp` (B,) float32.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, default_collate
from PIL import Image

from pipeline.augment import CropSpec, apply_view, draw_views, eval_view
from pipeline.errors import UserError

SHUFFLE_BUFFER = 2000  # samples (still encoded): a few shards' worth mixes classes well


@dataclass(frozen=True)
class Shard:
    url: str
    start: int  # global row range [start, stop)
    stop: int


def split_shards(shards_dir: str, manifest: dict, split: str) -> list[Shard]:
    """The shards of `split` with their row ranges, in row order."""
    if split not in manifest["splits"]:
        raise UserError(f"{shards_dir}: the dataset has no {split!r} split")
    return [Shard(f"{shards_dir.rstrip('/')}/{s['file']}", *s["rows"])
            for s in manifest["splits"][split]["shards"]]


# Views drawn fresh (no store: teachers, CE students) start here, disjoint from the V views a
# dump caches (V < 2**20), so a teacher never trains on the very crops it later labels.
FRESH_VIEW_OFFSET = 2**20


@dataclass(frozen=True)
class ViewSource:
    """Where a training sample's crop comes from in epoch `epoch`.

    Epoch e takes views e*m .. e*m+m-1, m = views_per_decode crops per decoded image:
    - with a store (students), modulo its V, replaying the stored boxes, flips and logits;
    - with `cached_views` = V and no store (students with an online teacher or plain CE),
      the same views drawn from (seed, view, row): the crops a store would hold;
    - with neither (teachers), fresh views past FRESH_VIEW_OFFSET.
    """

    seed: int
    epoch: int
    views_per_decode: int = 1
    crop: CropSpec = CropSpec()
    store: object | None = None  # a pipeline.store.LogitStore
    cached_views: int = 0

    def view_ids(self) -> list[int]:
        first = self.epoch * self.views_per_decode
        ids = range(first, first + self.views_per_decode)
        if self.store is not None:
            return [v % self.store.views for v in ids]
        if self.cached_views:
            return [v % self.cached_views for v in ids]
        return [FRESH_VIEW_OFFSET + v for v in ids]


def train_loader(shards: list[Shard], views: ViewSource, *, batch_size: int,
                 image_size: int, workers: int, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False) -> DataLoader:
    """One epoch of training batches for this rank (see the module docstring)."""
    order = np.random.default_rng([views.seed, views.epoch]).permutation(len(shards))
    mine = [shards[i] for i in order][rank::world_size]  # node split, set explicitly
    by_url = {s.url: s for s in mine}
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([s.url for s in mine]),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        _attach_views(by_url, views),
        wds.shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER // 4, seed=int(
            np.random.SeedSequence([views.seed, views.epoch, rank]).generate_state(1)[0])),
        _decode_and_crop(views, image_size),
        wds.batched(batch_size, collation_fn=default_collate, partial=True),
    )
    return _loader(pipeline, workers, pin_memory)


def eval_loader(shards: list[Shard], *, batch_size: int, image_size: int, workers: int,
                pin_memory: bool = False) -> DataLoader:
    """Evaluation batches: resize + center crop, every sample once, no shuffling."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([s.url for s in shards]),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.map(lambda sample: _eval_sample(sample, image_size)),
        wds.batched(batch_size, collation_fn=default_collate, partial=True),
    )
    return _loader(pipeline, workers, pin_memory)


def _loader(pipeline, workers: int, pin_memory: bool) -> DataLoader:
    # Batches are built in the workers; each worker reads whole, disjoint shards.
    return DataLoader(pipeline, batch_size=None, num_workers=workers, pin_memory=pin_memory)


def decode(sample: dict) -> torch.Tensor:
    """The sample's image as (3, H, W) uint8 RGB (PIL: torchvision's decoders are deprecated
    from 0.29)."""
    data = sample.get("jpg", sample.get("png"))
    if data is None:
        raise UserError(f"{sample.get('__url__')}: sample {sample['__key__']} has no jpg/png")
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB"))  # (H, W, 3)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def _eval_sample(sample: dict, image_size: int) -> dict:
    meta = json.loads(sample["json"])
    return {"images": eval_view(decode(sample), image_size), "labels": meta["label"],
            "rows": meta["row"]}


def _attach_views(by_url: dict[str, Shard], views: ViewSource):
    """Stage: parse each (still encoded) sample's metadata and, from a store, attach its m
    cached views (crop + logits), read once per shard."""
    view_ids = views.view_ids()

    def stage(samples):
        current, cached = None, None
        for sample in samples:
            sample["meta"] = meta = json.loads(sample["json"])
            if views.store is not None:
                shard = by_url[sample["__url__"]]
                if shard is not current:  # one read per view per shard per epoch
                    current = shard
                    cached = [views.store.read_rows(v, shard.start, shard.stop)
                              for v in view_ids]
                sample["views"] = [_cached_view(part, meta, shard, views.store)
                                   for part in cached]
            yield sample

    return stage


def _cached_view(part: dict, meta: dict, shard: Shard, store) -> dict:
    row = meta["row"]
    if not shard.start <= row < shard.stop or store.labels[row] != meta["label"]:
        raise UserError(f"{shard.url}: row {row} (label {meta['label']}) does not match the "
                        f"logit store {store.path}; it was dumped from other shards: rerun "
                        "dump_logits")
    i = row - shard.start
    return {"box": part["boxes"][i], "flip": part["flips"][i],
            "topk_logits": torch.from_numpy(part["topk_logits"][i]),
            "topk_classes": torch.from_numpy(part["topk_classes"][i].astype(np.int64)),
            "logsumexp": torch.tensor(part["logsumexp"][i])}


def _decode_and_crop(views: ViewSource, image_size: int):
    """Stage: decode each image once, emit one training sample per view (stored views are
    replayed; without a store they are drawn here, on the decoded image's size)."""
    view_ids = views.view_ids()

    def stage(samples):
        for sample in samples:
            image = decode(sample)  # (3, H, W) uint8
            meta = sample["meta"]
            crops = sample.get("views")
            if crops is None:
                boxes, flips = draw_views(views.seed, view_ids, [meta["row"]], image.shape[1],
                                          image.shape[2], spec=views.crop)
                crops = [{"box": boxes[j, 0], "flip": flips[j, 0]} for j in range(len(boxes))]
            for view in crops:
                out = {"images": apply_view(image, view["box"], bool(view["flip"]), image_size),
                       "labels": meta["label"], "rows": meta["row"]}
                out.update({k: v for k, v in view.items() if k not in ("box", "flip")})
                yield out

    return stage
