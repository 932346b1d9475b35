"""`verify_store`: read every chunk of every array of a logit store and report what is wrong."""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.store.reading import LogitStore, open_store


def verify_store(path: str, fingerprint: str | None = None, progress: bool = False) -> list[str]:
    """Every problem found in the store, as readable sentences (empty list = OK).

    Checks: the store opens and its attributes fit the schema and the arrays' shapes; it matches
    `fingerprint` if given; it is complete and every shard is marked complete; every chunk of
    every array (all views of all shards, labels, class priors, the tail basis) reads back with
    its recorded checksum; logsumexp and boxes are finite, boxes in [0, 1], class ids and labels below C.
    """
    try:
        store = open_store(path, fingerprint=fingerprint, require_complete=False)
    except (FileNotFoundError, UserError) as error:
        return [str(error)]
    problems = []
    if not store.complete:
        problems.append("store is incomplete (the complete flag is not set); rerun dump_logits")
    missing = sorted(set(range(store.num_shards)) - store.completed_shards())
    if missing:
        problems.append(f"{len(missing)} of {store.num_shards} shards not written: {missing[:20]}")
    try:
        labels = store.labels
    except UserError as error:
        problems.append(str(error))
        labels = None
    try:
        store.tail_basis  # noqa: B018 (reads and checks the quantised tail's basis)
    except UserError as error:
        problems.append(str(error))
    for shard_index in tqdm(sorted(store.completed_shards()), desc="verify", unit="shard",
                            disable=not progress):
        problems += _verify_shard(store, shard_index, labels)
    for temperature in store.temperatures:
        try:
            prior = store.class_prior(temperature)
        except (KeyError, UserError) as error:
            problems.append(str(error))
            continue
        if not np.isfinite(prior).all():
            problems.append(f"class prior at T={temperature} has non-finite values")
    return problems


def _verify_shard(store: LogitStore, shard_index: int, labels: np.ndarray | None) -> list[str]:
    start, stop = store.shard_bounds(shard_index)
    problems = []
    for view in range(store.views):
        try:
            rows = store.read_rows(view, start, stop)
        except UserError as error:
            problems.append(str(error))
            continue
        where = f"shard {shard_index} (rows {start}..{stop - 1}), view {view}"
        for name in ("topk_log_probs", "logsumexp", "boxes"):
            if not np.isfinite(rows[name]).all():
                problems.append(f"{where}: non-finite {name}")
        if ((rows["boxes"] < 0) | (rows["boxes"] > 1)).any():
            problems.append(f"{where}: crop box outside [0, 1]")
        if (rows["topk_classes"] >= store.num_classes).any():
            problems.append(f"{where}: class id >= {store.num_classes}")
    if labels is not None and (labels[start:stop] >= store.num_classes).any():
        problems.append(f"shard {shard_index}: label >= {store.num_classes}")
    return problems
