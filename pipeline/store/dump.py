"""Stage one's dump: every train row, V seeded views, the teacher's top-k logits, into the
teacher's Zarr store (format: pipeline/store/ and docs/store-format.md).

Per WebDataset shard: decode each image once, draw its V views from (seed, view, row), run the
teacher (eval mode, no gradients) on each view, keep the top-k log-probabilities (logit -
logsumexp), their classes and the log-sum-exp over all classes (and, with `logits.tail:
quantized`, every other class's logit, quantised), and add the full logits to the exact class
priors. A shard is written whole, marker last, so a rerun after a crash skips complete shards
and rewrites a partial one. The store is marked complete only after every shard and the priors are written.
"""

from __future__ import annotations

import errno
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from tqdm import tqdm

from pipeline.stream.augment import CropSpec, crop_spec, draw_views, normalize
from pipeline.stream.device_decode import (DEVICE_DECODE, cut_views, decode_on_device, decode_path,
                                    decode_summary, worker_payload)
from pipeline.train.checkpoints import load_model
from pipeline.distributed import distributed
from pipeline.errors import UserError
from pipeline.locks import exclusive_writer
from pipeline.storage import storage_errors
from pipeline.train.priors import ClassPriorAccumulator
from pipeline.params import Params, ParamsError, topk_problems
from pipeline.data.manifest import file_sha256, load_manifest
from pipeline.store import (TAIL_FIT_ROWS, TailBasis, check_image_sides, completed_shards,
                            create_prior_partials, create_store, drop_prior_partials,
                            finalize_store, fit_tail_basis, has_tail, identity, open_existing,
                            reduce_prior_partials, store_identity, verify_store,
                            write_prior_partials, write_shard, write_tail_basis)
from pipeline.store.encoding import first_non_finite
from pipeline.store.swap import leftovers, remove_store, swap_in
from pipeline.store.tail import tail_components
from pipeline.stream.loader import Shard, read_shard, split_shards
from pipeline.stream.decode import SourceImage


def dump_logits(params: Params, teacher_name: str, shards_dir: str, checkpoint: str,
                store_path: str) -> None:
    """Fill `store_path` with `teacher_name`'s logits on every train row. Under torchrun each
    rank writes the shards index % world_size == rank; rank 0 creates the store first and
    writes the priors and the completion flag after every rank is done."""
    # The name is recorded in the store and names the teacher to `inspect` and the student's
    # `student.teacher`: a typo must stop here, not yield a store nobody will look for.
    if teacher_name not in params.teachers:
        raise UserError(f"{teacher_name!r} is not a key of teachers (known: "
                        f"{', '.join(params.teachers)}); pass --name with one of them")
    manifest = load_manifest(shards_dir)
    shards = split_shards(shards_dir, manifest, "train")
    settings, spec = params.logits, crop_spec(params.augment)
    num_classes = manifest["num_classes"]
    # A change of logits.topk reruns the dump alone: the teacher run's check saw other params.
    if problems := topk_problems(settings, num_classes, shards_dir):
        raise ParamsError(problems)
    ranks = distributed()
    teacher, state = load_model(checkpoint)
    trained_size = state["params"]["train"]["image_size"]
    if trained_size != settings.image_size:
        raise UserError(f"logits.image_size: {settings.image_size} differs from the "
                        f"{trained_size} px the teacher {teacher_name!r} was trained at "
                        f"({checkpoint}); set logits.image_size: {trained_size}")
    teacher = teacher.to(ranks.device)
    decode = decode_path(params.student.decode, ranks.device)
    attributes = {
        "teacher_name": teacher_name, "teacher_arch": state["arch"],
        "teacher_sha256": file_sha256(checkpoint), "teacher_image_size": settings.image_size,
        "fingerprint": manifest["fingerprint"], "class_names": manifest["class_names"],
        "augmentation": spec.as_dict(), "seed": params.seed,
        # Part of the identity: shards written before a change of temperatures hold no prior
        # partial sums at the new ones, so such a store must be dumped afresh, not resumed.
        "prior_temperatures": sorted(float(t) for t in settings.prior_temperatures),
        # The store encodes boxes exactly up to this side; smaller sides, fewer bytes.
        "max_image_side": manifest["splits"]["train"]["max_image_side"],
        # how views become pixels (pipeline/stream/device_decode.py): the student's, so its replay is
        # the teacher's pixels; part of the identity, a change re-dumps
        "decode": decode,
    }
    if decode == DEVICE_DECODE:  # its pixels may differ in the last bits from device to device
        attributes["decode_device"] = ranks.device.type
    if ranks.is_main:
        summary = decode_summary(decode, params.student.decode, ranks.device)
        print(f"dump {teacher_name}: {summary}; the dump decodes as its student will",
              flush=True)
    shape = dict(rows=manifest["splits"]["train"]["rows"], views=settings.views,
                 topk=settings.topk, num_classes=num_classes,
                 shard_rows=shards[0].stop - shards[0].start, tail=settings.tail)
    wanted = store_identity(**shape, attributes=attributes)
    # One writer per store: a second dump (rank 0 of another job) is refused at once.
    with (exclusive_writer(store_path, "logit dump") if ranks.is_main else nullcontext(),
          storage_errors(store_path)):
        try:
            _dump(store_path, wanted, shape, attributes, shards, teacher, params, teacher_name,
                  ranks)
        except OSError as error:  # a full disk: the shards written so far are kept
            if error.errno != errno.ENOSPC:
                raise
            raise UserError(f"{store_path}: no space left on the device (disk full) while "
                            "writing the logit store; free space there and rerun dump_logits: "
                            "it resumes after the shards already written") from None


def _dump(store_path: str, wanted: dict, shape: dict, attributes: dict, shards: list[Shard],
          teacher, params: Params, teacher_name: str, ranks) -> None:
    settings, spec = params.logits, crop_spec(params.augment)
    num_classes = shape["num_classes"]
    # Rank 0 decides first (finishing an interrupted swap, clearing a stale replacement),
    # then the others, on what rank 0 left; all before rank 0 writes anything.
    if ranks.is_main:
        target = _target_path(store_path, wanted, is_main=True)
    ranks.barrier()
    if not ranks.is_main:
        target = _target_path(store_path, wanted, is_main=False)
    if target is None:
        if ranks.is_main:
            print(f"{store_path} is complete and matches this dump; kept as it is")
        return
    ranks.barrier()
    # Rank 0 first, then the others (no-ops after rank 0; they matter when ranks run one
    # after another): the store, its prior partial sums and its tail basis.
    for turn in ("main", "others"):
        if ranks.is_main == (turn == "main"):
            group = create_store(target, **shape, attributes=attributes)
            create_prior_partials(group, settings.prior_temperatures)
            if has_tail(dict(group.attrs)) and "tail_basis_checksums" not in group.attrs:
                # checksums are written last: without them the basis is absent or torn
                write_tail_basis(group, _fit_tail_basis(shards, teacher, params, spec,
                                                        num_classes, ranks.device,
                                                        group.attrs["decode"]))
        if turn == "main":
            ranks.barrier()  # the other ranks open the store rank 0 has created or kept
    done = completed_shards(group)
    todo = [i for i in range(len(shards)) if i % ranks.world_size == ranks.rank and i not in done]
    for index in tqdm(todo, desc=f"dump {teacher_name}", unit="shard", disable=not ranks.is_main):
        _dump_shard(group, index, shards[index], teacher, params, spec, ranks.device)
    ranks.barrier()  # every shard is written before the priors are reduced
    if ranks.is_main:
        finish_store(group)
        if target != store_path:
            _swap_in(target, store_path)
    ranks.barrier()


REPLACEMENT_SUFFIX = ".next"


def _target_path(store_path: str, wanted: dict, is_main: bool) -> str | None:
    """Where this dump writes: None when a complete store with exactly these attributes is
    already there (kept, never rewritten); the store itself when it is absent or an unfinished
    dump of the same (resumed); otherwise a replacement beside it, swapped in once complete, so
    a crash never leaves less than there was. A complete matching store that fails
    `verify_store` (a missing or damaged chunk) is rebuilt the same way. Rank 0 (`is_main`) also
    finishes a swap a crash interrupted and clears a stale replacement."""
    replacement = store_path + REPLACEMENT_SUFFIX
    previous = open_existing(replacement, mode="r")
    existing = open_existing(store_path, mode="r")
    if previous is not None and previous.attrs.get("complete") and existing is None:
        # Finished, then killed before or in the swap (pipeline/store/swap.py: on object
        # storage the old store is gone before the new one is in). Finished whatever its
        # params: it is the newest complete store there is.
        if identity(dict(previous.attrs)) == wanted:
            if is_main:
                _swap_in(replacement, store_path)
            return None
        if is_main:
            _swap_in(replacement, store_path)
        previous, existing = None, open_existing(store_path, mode="r")
    if previous is not None and identity(dict(previous.attrs)) == wanted and (
            previous.attrs.get("complete")):  # finished, then killed before the swap
        if is_main:
            _swap_in(replacement, store_path)
        return None
    if existing is None:
        return store_path
    if identity(dict(existing.attrs)) == wanted:
        if not existing.attrs.get("complete"):
            return store_path
        # Kept only if every chunk still reads back with its checksum: a damaged store is
        # rebuilt beside it, never trusted (reading it costs far less than dumping it).
        problems = verify_store(store_path)
        if not problems:
            if is_main and previous is None and leftovers(replacement):
                remove_store(replacement)  # a swap's last step, interrupted (swap.py, 3.)
            return None
        if is_main:
            print(f"{store_path} matches this dump but is damaged ({problems[0]}); "
                  "rebuilding it")
    if is_main:
        if previous is not None and identity(dict(previous.attrs)) != wanted:
            _remove(replacement)  # a stale replacement of some other dump
        elif previous is None and leftovers(replacement):
            _remove(replacement)  # what an interrupted swap left of a replacement
        print(f"{store_path}: building its replacement in {replacement}, swapped in when "
              "complete")
    return replacement


_swap_in = swap_in  # a module global, so that tests can inject a crash into it
_remove = remove_store


def _fit_tail_basis(shards: list[Shard], teacher, params: Params, spec: CropSpec,
                    num_classes: int, device, decode: str) -> TailBasis:
    """The quantised tail's PCA basis, fitted on the teacher's log-probabilities of view 0 of
    the first TAIL_FIT_ROWS train rows (prepare shuffles rows, so they mix classes): the same
    rows, crops and teacher on every run, so the basis, and the store, are reproducible."""
    images, rows, urls = [], [], []
    for shard in shards:
        for sample in read_shard(shard):
            images.append(SourceImage(sample))
            rows.append(sample["meta"]["row"])
            urls.append(shard.url)
        if len(rows) >= TAIL_FIT_ROWS:
            break
    images, rows = images[:TAIL_FIT_ROWS], rows[:TAIL_FIT_ROWS]
    boxes, flips = draw_views(params.seed, 1, np.array(rows),
                              [image.height for image in images],
                              [image.width for image in images], spec=spec)  # view 0
    decoded = _decoded_on_device(images, decode, device)
    logits = _teacher_logits(teacher, images, boxes[0], flips[0], params.logits, device,
                             decoded)
    _check_finite(logits, rows, 0, urls)
    log_probs = torch.log_softmax(logits.double(), dim=1).numpy()  # (m, C)
    return fit_tail_basis(log_probs, tail_components(num_classes))


def finish_store(group) -> None:
    """Exact class priors from all shards' partial sums, then the completion flag (last)."""
    finalize_store(group, reduce_prior_partials(group))
    drop_prior_partials(group)


def _dump_shard(group, index: int, shard: Shard, teacher, params: Params, spec: CropSpec,
                device) -> None:
    settings = params.logits
    samples = list(read_shard(shard))
    metas = [sample["meta"] for sample in samples]
    images = [SourceImage(sample) for sample in samples]  # decoded once per draft scale
    decoded = _decoded_on_device(images, group.attrs["decode"], device)  # or once here
    rows = np.array([meta["row"] for meta in metas])
    labels = np.array([meta["label"] for meta in metas])
    if not np.array_equal(rows, np.arange(shard.start, shard.stop)):
        raise UserError(f"{shard.url}: rows {rows[:3]}... do not match the manifest range "
                        f"[{shard.start}, {shard.stop}); rerun prepare")
    heights = [image.height for image in images]
    widths = [image.width for image in images]
    check_image_sides(group.attrs, rows, heights, widths)
    boxes, flips = draw_views(params.seed, settings.views, rows, heights, widths,
                              spec=spec)  # (V, n, 4), (V, n)
    num_classes = group.attrs["num_classes"]
    priors = {t: ClassPriorAccumulator(num_classes, weight_temperature=t)
              for t in settings.prior_temperatures}
    logits = []  # per view (n, C) float32
    for view in range(settings.views):
        view_logits = _teacher_logits(teacher, images, boxes[view], flips[view], settings,
                                      device, decoded)
        _check_finite(view_logits, rows, view, shard.url)
        logits.append(view_logits.numpy())
        for accumulator in priors.values():
            accumulator.update(view_logits, torch.from_numpy(labels))
    counts = next(iter(priors.values())).counts.numpy()
    write_prior_partials(group, index, {t: a.sums.numpy() for t, a in priors.items()}, counts)
    write_shard(group, index, logits=np.stack(logits), boxes=boxes, flips=flips, labels=labels)


def _check_finite(logits: torch.Tensor, rows, view: int, urls) -> None:
    """Stop on NaN or Inf teacher logits (n, C), naming the first row, the view and the row's
    shard (urls: one per row, or one for all)."""
    if (where := first_non_finite(logits.numpy())) is not None:
        first = where[0]
        url = urls if isinstance(urls, str) else urls[first]
        raise UserError(f"teacher logits are NaN or Inf at row {int(rows[first])}, view {view} "
                        f"({url}); check the teacher checkpoint")


def _decoded_on_device(images: list[SourceImage], decode: str, device) -> list | None:
    """On the device path, the images decoded once on `device` ((3, H, W) uint8 each: one
    shard's worth, or the tail basis's rows); None on the CPU path (SourceImage decodes)."""
    if decode != DEVICE_DECODE:
        return None
    return decode_on_device([worker_payload(image) for image in images], device)


@contextmanager
def _ieee_float32():
    """float32 convolutions and matrix products in full float32 on CUDA: cuDNN's default for
    float32 convolutions is TF32 (10 mantissa bits, fewer than the store's float16), which
    would put the same error in the logsumexp and priors that bf16 would."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        flags = [(conv, "fp32_precision", "ieee"),
                 (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
    else:  # torch < 2.9: the legacy flags
        flags = [(torch.backends.cudnn, "allow_tf32", False),
                 (torch.backends.cuda.matmul, "allow_tf32", False)]
    saved = [getattr(owner, name) for owner, name, _ in flags]
    for owner, name, value in flags:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(flags, saved):
            setattr(owner, name, value)


@torch.no_grad()
@_ieee_float32()
def _teacher_logits(teacher, images, boxes, flips, settings, device,
                    decoded: list | None = None) -> torch.Tensor:
    """(n, C) float32 logits of one view of every image, in batches: cut from the images
    `decoded` on the device (device path), else by each SourceImage (CPU path).

    Computed in float32 (TF32 off), without bf16 autocast: bf16 logits keep 8 significant
    bits, fewer than the store's float16 (11), and the logsumexp and class priors, which the
    contract says are exact, would inherit that error. The dump runs once per teacher; its cost is V
    forward passes over the train split.
    """
    chunks = []
    for start in range(0, len(images), settings.batch_size):
        stop = start + settings.batch_size
        if decoded is None:
            crops = torch.stack([image.crop(box, bool(flip), settings.image_size)
                                 for image, box, flip in zip(
                                     images[start:stop], boxes[start:stop], flips[start:stop])])
        else:  # the student's device path: apply_view of the full decode
            crops = cut_views(decoded[start:stop], boxes[start:stop], flips[start:stop],
                              settings.image_size)
        batch = normalize(crops.to(device, non_blocking=True))
        chunks.append(teacher(batch).float().cpu())
    return torch.cat(chunks)
