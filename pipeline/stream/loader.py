"""Streaming WebDataset shards into training and evaluation batches.

Training chain (one epoch): shard list -> seeded shard shuffle -> this rank's rows (an equal
share of the epoch's shuffled row order, set explicitly) -> split by DataLoader worker -> tar
samples (opened through fsspec: local paths or URLs) -> attach each sample's crop (and, for a
student, its cached teacher logits, read once per shard) -> shuffle buffer -> decode once ->
m crops (or, on the device decode path, m views still encoded) -> small chunks in the
workers -> exact batches in the main process. The logits ride along with their own sample
through the shuffle, so pairing cannot drift; a store row whose label differs from the
shard's stops the run.

Every rank gets ceil(N / world_size) rows per epoch (the last ranks wrap around to the start
of the epoch's order, as DistributedSampler pads) and so the same number of batches, which
DDP needs; with one process every row is seen exactly once. `batch_size` here is the rank's
batch (the caller divides the global batch by the world size); with `drop_last` each rank
drops its short last batch, as the official loader (DistributedSampler + drop_last=True).

A batch is a dict of tensors: `images` (B, 3, S, S) uint8 (on the device decode path instead
`payloads`, a list of B encoded JPEGs or decoded other images, `boxes` (B, 4) float32 and
`flips` (B,) bool, turned into images on the training device by
pipeline.stream.device_decode.batch_pixels), `labels` (B,) int64, `rows` (B,) int64, and for a
student the store's fields of its teacher logits (pipeline.store.LOGIT_FIELDS):
`topk_log_probs` (B, k) float16, `topk_classes` (B, k) int64, `logsumexp` (B,) float32 and, with
a quantised tail, `tail_coefficients` (B, r) int8 (int16 above C = 1000) and `tail_residuals`
(B, C) int16; the trainer decodes them into (B, C) logits on its device
(pipeline.train.runs.CachedTeacher). A run keeps one `TrainStream`: its workers live across
epochs, each epoch's chain built inside them from a shared epoch number.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, default_collate

from pipeline.data.manifest import shard_url
from pipeline.errors import UserError
from pipeline.store import LOGIT_FIELDS
from pipeline.stream.augment import DECODE, draw_views, eval_view
from pipeline.stream.decode import SourceImage, decode
from pipeline.stream.device_decode import DEVICE_DECODE, worker_payload
from pipeline.stream.tars import read_samples
from pipeline.stream.views import CachedViews, FreshViews, StoredViews, Views

SHUFFLE_BUFFER = 2000  # samples (still encoded): a few shards' worth mixes classes well
WORKER_CHUNK = 64  # samples a worker sends at once: few transfers, exact batches after


@dataclass(frozen=True)
class Shard:
    url: str
    start: int  # global row range [start, stop)
    stop: int


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of one shard, read by one rank in one epoch."""

    shard: Shard
    start: int
    stop: int


def split_shards(shards_dir: str, manifest: dict, split: str) -> list[Shard]:
    """The shards of `split` with their row ranges, in row order."""
    if split not in manifest["splits"]:
        raise UserError(f"{shards_dir}: the dataset has no {split!r} split")
    return [Shard(shard_url(shards_dir, s["file"]), *s["rows"])
            for s in manifest["splits"][split]["shards"]]


class TrainStream:
    """The training batches of one run, one `epoch(e)` at a time, from DataLoader workers
    started once and kept alive across epochs (`persistent_workers`): an epoch's chain (see
    the module docstring) is built inside each worker from the epoch number, which the main
    process writes into a shared-memory tensor before it starts the epoch. `views` gives
    everything but the epoch (its `epoch` is ignored); the other arguments as `train_loader`.
    """

    def __init__(self, shards: list[Shard], views: Views, *, batch_size: int,
                 image_size: int, workers: int, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False, drop_last: bool = False, decode: str = DECODE):
        if decode not in (DECODE, DEVICE_DECODE):
            raise ValueError(f"unknown decode path {decode!r}")
        self.epoch_number = torch.zeros((), dtype=torch.int64).share_memory_()
        self.dataset = _EpochChain(shards, views, self.epoch_number, rank, world_size,
                                   min(batch_size, WORKER_CHUNK), image_size, decode)
        self.loader = DataLoader(self.dataset, batch_size=None, num_workers=workers,
                                 pin_memory=pin_memory, persistent_workers=workers > 0)
        self.batch_size, self.drop_last = batch_size, drop_last
        self.steps = epoch_steps(sum(s.stop - s.start for s in shards), views.views_per_decode,
                                 batch_size, world_size, drop_last=drop_last)

    def epoch(self, epoch: int) -> EpochBatches:
        """Epoch `epoch`'s batches (iterate them before asking for the next epoch)."""
        return EpochBatches(self.loader, self.batch_size, self.steps, self.drop_last,
                            epoch=(self.epoch_number, epoch))


class _EpochChain(torch.utils.data.IterableDataset):
    """One worker's share of the epoch whose number `epoch_number` holds: the webdataset
    chain of the module docstring, built afresh at each pass (cheap: no data is read here)."""

    def __init__(self, shards, views, epoch_number, rank, world_size, chunk, image_size,
                 decode):
        self.shards, self.views, self.epoch_number = shards, views, epoch_number
        self.rank, self.world_size, self.chunk = rank, world_size, chunk
        self.image_size, self.decode = image_size, decode

    def __iter__(self):
        views = replace(self.views, epoch=int(self.epoch_number))
        order = np.random.default_rng([views.order_seed, views.epoch]).permutation(
            len(self.shards))
        segments = rank_segments([self.shards[i] for i in order], self.rank, self.world_size)
        attach_views = _attach_drawn_views if views.store is None else _attach_cached_views
        shuffle_seed = np.random.SeedSequence([views.order_seed, views.epoch, self.rank])
        return iter(wds.DataPipeline(
            partial(iter, [{"url": s.shard.url, "segment": s} for s in segments]),
            wds.split_by_worker,
            read_samples,
            attach_views(views),
            wds.shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER // 4,
                        seed=int(shuffle_seed.generate_state(1)[0])),
            _training_samples(self.image_size, self.decode),
            wds.batched(self.chunk, collation_fn=_collate, partial=True),
        ))


def train_loader(shards: list[Shard], views: Views, *, batch_size: int,
                 image_size: int, workers: int, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False, drop_last: bool = False,
                 decode: str = DECODE) -> EpochBatches:
    """One epoch (`views.epoch`) of training batches for this rank (see the module
    docstring): `TrainStream(...).epoch(views.epoch)`; a run of several epochs keeps one
    TrainStream, so its workers start once. `decode`: the decode path, DECODE (the workers
    decode and cut the views: `images`) or DEVICE_DECODE (they ship `payloads`, `boxes` and
    `flips` for pipeline.stream.device_decode.batch_pixels)."""
    return TrainStream(shards, views, batch_size=batch_size, image_size=image_size,
                       workers=workers, rank=rank, world_size=world_size,
                       pin_memory=pin_memory, drop_last=drop_last,
                       decode=decode).epoch(views.epoch)


def epoch_steps(rows: int, views_per_decode: int, batch_size: int, world_size: int, *,
                drop_last: bool = False) -> int:
    """Optimizer steps per epoch on every rank, B the rank's batch: ceil(ceil(N / W) * m / B),
    or floor(ceil(N / W) * m / B) with `drop_last`."""
    samples = _ceil_div(rows, world_size) * views_per_decode
    return samples // batch_size if drop_last else _ceil_div(samples, batch_size)


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def rank_segments(shards: list[Shard], rank: int, world_size: int) -> list[Segment]:
    """This rank's share of the rows of `shards` taken in the given order: positions
    [rank * n, (rank + 1) * n) with n = ceil(N / world_size), wrapping past the end."""
    total = sum(s.stop - s.start for s in shards)
    share = _ceil_div(total, world_size)
    wanted = [(rank * share, min((rank + 1) * share, total))]
    if (rank + 1) * share > total:  # pad: wrap around to the epoch's first rows
        wanted.append((0, (rank + 1) * share - max(rank * share, total)))
    segments, offset = [], 0
    for shard in shards:
        size = shard.stop - shard.start
        for low, high in wanted:
            lo, hi = max(low, offset), min(high, offset + size)
            if lo < hi:
                segments.append(Segment(shard, shard.start + lo - offset,
                                        shard.start + hi - offset))
        offset += size
    return segments


class EpochBatches:
    """The batches of one epoch: workers send small chunks, cut here into exact batches so
    the count is known in advance (`len`) and equal on every rank; the short last batch is
    dropped with `drop_last`. `epoch`: (the stream's shared epoch number, this epoch), written
    before the workers' pass starts, which is when each of them reads it."""

    def __init__(self, loader, batch_size: int, steps: int, drop_last: bool = False, *,
                 epoch: tuple[torch.Tensor, int] | None = None):
        self.loader, self.batch_size, self.steps = loader, batch_size, steps
        self.drop_last, self.epoch = drop_last, epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        if self.epoch is not None:
            shared, epoch = self.epoch
            shared.fill_(epoch)
        pending, count = [], 0
        for chunk in self.loader:
            pending.append(chunk)
            count += len(chunk["labels"])
            while count >= self.batch_size:
                merged = _concat(pending)
                yield {key: value[:self.batch_size] for key, value in merged.items()}
                count -= self.batch_size
                # nothing left over (chunk = batch, the usual case): the next chunk is the
                # next batch as the worker wrote it, not a copy through torch.cat
                pending = [{key: value[self.batch_size:] for key, value in merged.items()}
                           ] if count else []
        if count and not self.drop_last:
            yield _concat(pending)


def _concat(chunks: list[dict]) -> dict:
    if len(chunks) == 1:
        return chunks[0]
    return {key: ([item for chunk in chunks for item in chunk[key]]
                  if isinstance(chunks[0][key], list)
                  else torch.cat([chunk[key] for chunk in chunks])) for key in chunks[0]}


def _collate(samples: list[dict]) -> dict:
    """A chunk of training samples as one dict of tensors, each written once: the images
    stacked straight into one buffer (in a worker, shared memory, which the DataLoader then
    hands over without a copy; the main process pins it when training on CUDA), the store's
    fields gathered from the shard's arrays with one index per field, not built as tensors
    per sample. The device path's `payloads` (bytes and images of any size) stay a list."""
    first = samples[0]
    batch = {"labels": torch.tensor([sample["labels"] for sample in samples]),
             "rows": torch.tensor([sample["rows"] for sample in samples])}
    if "images" in first:
        batch["images"] = _stack([sample["images"] for sample in samples])
    else:
        batch["payloads"] = [sample["payloads"] for sample in samples]
        batch["boxes"] = torch.from_numpy(np.stack([sample["boxes"] for sample in samples]))
        batch["flips"] = torch.tensor([sample["flips"] for sample in samples])
    if "logits" in first:  # (shard's rows as read, index) per sample
        for name in LOGIT_FIELDS:
            if name in first["logits"][0]:
                values = np.stack([part[name][i] for part, i in
                                   (sample["logits"] for sample in samples)])
                batch[name] = torch.from_numpy(
                    values.astype(np.int64) if name == "topk_classes" else values)
    return batch


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, into shared memory when in a DataLoader worker (default_collate's way)."""
    out = None
    if torch.utils.data.get_worker_info() is not None:
        first = tensors[0]
        storage = first._typed_storage()._new_shared(len(tensors) * first.numel(),
                                                      device=first.device)
        out = first.new(storage).resize_(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


def eval_loader(shards: list[Shard], *, batch_size: int, image_size: int, workers: int,
                rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """Evaluation batches: resize + center crop, no shuffling; this rank's whole shards
    (every sample once over all ranks)."""
    segments = [Segment(s, s.start, s.stop) for s in shards[rank::world_size]]
    pipeline = wds.DataPipeline(
        partial(iter, [{"url": s.shard.url, "segment": s} for s in segments]),
        wds.split_by_worker,
        read_samples,
        wds.map(lambda sample: _eval_sample(sample, image_size)),
        wds.batched(batch_size, collation_fn=default_collate, partial=True),
    )
    return _loader(pipeline, workers, pin_memory)


def _loader(pipeline, workers: int, pin_memory: bool) -> DataLoader:
    # Batches (or chunks) are built in the workers; each worker reads whole, disjoint shards.
    return DataLoader(pipeline, batch_size=None, num_workers=workers, pin_memory=pin_memory)


def read_shard(shard: Shard):
    """Every sample of one shard, in row order, with its parsed `meta` (json)."""
    yield from read_samples([{"url": shard.url, "segment": Segment(shard, shard.start,
                                                                    shard.stop)}])


def _eval_sample(sample: dict, image_size: int) -> dict:
    meta = sample["meta"]
    return {"images": eval_view(decode(sample), image_size), "labels": meta["label"],
            "rows": meta["row"]}


def _attach_cached_views(views: StoredViews):
    """Stage: each (still encoded) sample's m cached views, crop and logits, from the store,
    read once per shard and view."""
    view_ids = views.view_ids()

    def stage(samples):
        current, cached = None, None
        for sample in samples:
            shard = sample["segment"].shard
            if shard is not current:  # one read per view per shard per epoch
                current = shard
                cached = [views.store.read_rows(v, shard.start, shard.stop) for v in view_ids]
            meta = sample["meta"]
            row = meta["row"]
            if not shard.start <= row < shard.stop or views.store.labels[row] != meta["label"]:
                raise UserError(f"{shard.url}: row {row} (label {meta['label']}) does not match "
                                f"the logit store {views.store.path}; it was dumped from other "
                                "shards: rerun dump_logits")
            i = row - shard.start
            # where its logits are, not the logits: `_collate` gathers a chunk's at once
            sample["views"] = [{"box": part["boxes"][i], "flip": part["flips"][i],
                                "logits": (part, i)} for part in cached]
            yield sample

    return stage


def _attach_drawn_views(views: CachedViews | FreshViews):
    """Stage: each (still encoded) sample's m views drawn from (seed, view, row), one
    draw_views call per segment (per sample it costs ~160 us of numpy overhead, per segment
    ~1 us a row), on the image sizes read from the encoded headers."""
    view_ids = views.view_ids()

    def with_views(segment_samples: list[dict]):
        for sample in segment_samples:  # its header read once, here; decoded after the shuffle
            sample["image"] = SourceImage(sample)
        boxes, flips = draw_views(views.seed, view_ids,
                                  [sample["meta"]["row"] for sample in segment_samples],
                                  [sample["image"].height for sample in segment_samples],
                                  [sample["image"].width for sample in segment_samples],
                                  spec=views.crop)
        for i, sample in enumerate(segment_samples):
            sample["views"] = [{"box": boxes[j, i], "flip": flips[j, i]}
                               for j in range(len(view_ids))]
            yield sample

    def stage(samples):
        pending = []
        for sample in samples:
            if pending and pending[-1]["segment"] is not sample["segment"]:
                yield from with_views(pending)
                pending = []
            pending.append(sample)
        if pending:
            yield from with_views(pending)

    return stage


def _training_samples(image_size: int, decode: str = DECODE):
    """Stage: one training sample per attached view. On the CPU path (DECODE) the view is cut
    here, each image decoded once per draft scale; on the device path it carries the image
    still encoded (`pipeline.stream.device_decode.worker_payload`, one object for all its views) with
    the view's box and flip."""

    def stage(samples):
        for sample in samples:
            image, meta = sample.get("image") or SourceImage(sample), sample["meta"]
            payload = None if decode == DECODE else worker_payload(image)
            for view in sample["views"]:
                if payload is None:
                    out = {"images": image.crop(view["box"], bool(view["flip"]), image_size)}
                else:
                    out = {"payloads": payload, "flips": bool(view["flip"]),
                           "boxes": view["box"]}
                out["labels"], out["rows"] = meta["label"], meta["row"]
                if "logits" in view:
                    out["logits"] = view["logits"]
                yield out

    return stage
