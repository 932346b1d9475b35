"""Hand-made logit stores on the digits shards (helpers.prepare_digits), written with
pipeline.store directly from full logits whose stored fields name their row and view (top
log-probability -(1 + (4 r + v) / 1024), exact in float16; logsumexp r + 1000 v; a tail that
differs per row) and boxes drawn under a seed the stream never sees, so a reader of the store can
check every value it gets against the row it claims to be."""

import numpy as np

from helpers import DIGITS, IMAGE_SIZE, SEED
from pipeline.store import (create_store, finalize_store, fit_tail_basis, shard_bounds,
                            write_shard, write_tail_basis)
from pipeline.store.tail import tail_components
from pipeline.stream.augment import CropSpec, draw_views

VIEWS = 3
BOX_SEED = 123  # the store's boxes come from another seed: the stream must replay, not redraw
BOX_SPEC = CropSpec(scale=(0.2, 1.0), flip_probability=0.5)  # flips too, so both are checked


def store_attributes(manifest, **changes) -> dict:
    attributes = dict(teacher_name="teacher", teacher_arch="resnet8", teacher_sha256="ab" * 32,
                      teacher_image_size=IMAGE_SIZE, fingerprint=manifest["fingerprint"],
                      class_names=manifest["class_names"], augmentation=BOX_SPEC.as_dict(),
                      seed=SEED)
    return {**attributes, **changes}


def row_code(views: int, rows: int) -> np.ndarray:
    """(V, N) 4 r + v: a distinct integer per (view, row)."""
    return 4 * np.arange(rows) + np.arange(views)[:, None]


def row_coded_logits(labels, views: int, num_classes: int) -> np.ndarray:
    """(V, N, C) float64 full logits whose store fields name their (view, row): the label's
    log-probability is -(1 + (4 r + v) / 1024) (exact in float16), class label + 1's half a nat
    less, the other classes share the rest in proportions 1 : 2 : ... (a tail that differs per
    row and class), and the logsumexp is r + 1000 v."""
    labels = np.asarray(labels, dtype=np.int64)
    rows = len(labels)
    code = row_code(views, rows)
    assert code.max() < 1024, "the top log-probabilities stay exact in float16"
    first = -(1 + code / 1024)  # (V, N), in [-1.34, -1]
    second = first - 0.5
    rest = 1 - np.exp(first) - np.exp(second)  # (V, N), > 0.4
    others = num_classes - 2
    shares = np.arange(1, others + 1) / (others * (others + 1) / 2)  # (C - 2,) summing to 1
    log_probs = np.empty((views, rows, num_classes))
    row_ids = np.arange(rows)
    for r, label in enumerate(labels):
        tail = [c for c in range(num_classes) if c not in (label, (label + 1) % num_classes)]
        log_probs[:, r, label] = first[:, r]
        log_probs[:, r, (label + 1) % num_classes] = second[:, r]
        log_probs[:, r, tail] = np.log(rest[:, r, None] * shares)  # each below second
    assert (np.sort(log_probs, -1)[..., -2] == second).all()  # the top 2 are label, label + 1
    return log_probs + (row_ids + 1000 * np.arange(views)[:, None])[..., None]


def write_row_coded_store(path, manifest, labels, *, views=VIEWS, tail="quantized",
                          **attribute_changes) -> dict:
    """A complete store (top-2 and, by default, a quantised tail) whose values name their
    (view, row); returns its inputs (V, N, ...): full logits, boxes and flips."""
    rows, num_classes = manifest["splits"]["train"]["rows"], manifest["num_classes"]
    labels = np.asarray(labels, dtype=np.int64)
    boxes, flips = draw_views(BOX_SEED, views, np.arange(rows), IMAGE_SIZE, IMAGE_SIZE,
                              spec=BOX_SPEC)
    arrays = dict(logits=row_coded_logits(labels, views, num_classes), boxes=boxes, flips=flips)
    group = create_store(str(path), rows=rows, views=views, topk=2, num_classes=num_classes,
                         shard_rows=DIGITS["shard_size"], tail=tail,
                         attributes=store_attributes(manifest, **attribute_changes))
    if tail == "quantized":  # the tail's PCA basis, before any shard (as the dump does)
        log_probs = arrays["logits"][0] - arrays["logits"][0].max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        write_tail_basis(group, fit_tail_basis(log_probs, tail_components(num_classes)))
    for index in range(len(manifest["splits"]["train"]["shards"])):
        start, stop = shard_bounds(rows, DIGITS["shard_size"], index)
        write_shard(group, index, **{name: array[:, start:stop] for name, array in arrays.items()},
                    labels=labels[start:stop])
    uniform = np.full((num_classes, num_classes), 1.0 / num_classes, np.float32)
    finalize_store(group, {1.0: uniform})
    return arrays
