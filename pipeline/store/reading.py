"""Reading a logit store: `open_store` validates it and `LogitStore` serves its rows, checked.

Every read is checked against the checksums recorded when the shard was written (a missing
chunk reads back as the fill value and fails its checksum; a damaged one fails the crc32c codec
or its checksum): the error names the array, the shard and the rows, and says to rerun the dump.
A read returns whole shards' chunks (one inner chunk per array per view), sliced to the rows
asked for.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import zarr

from pipeline.store.encoding import FORMAT_VERSION, decode_boxes, decode_fields, decode_logits
from pipeline.store.tail import TailBasis
from pipeline.store.layout import (
    CHECKSUMS, LABEL_CHECKSUMS, MARKERS, PRIOR_GROUP, ClassPriorNotFoundError, StoreCorruptError,
    StoreMismatchError, chunk_checksum, damaged_metadata, has_tail, json_normalise, prior_name, read_tail_basis,
    shard_bounds, short_repr, validate_attributes, view_arrays)

# The fields of a view that make its teacher logits (what the student's batches carry).
LOGIT_FIELDS = ("topk_log_probs", "topk_classes", "logsumexp", "tail_coefficients",
                "tail_residuals")


def open_store(path: str, *, fingerprint: str | None = None, seed: int | None = None,
               teacher_sha256: str | None = None, require_complete: bool = True) -> "LogitStore":
    """Open a store for reading, refusing one that is not the expected, finished dump.

    Each of fingerprint / seed / teacher_sha256 that is given must equal the stored attribute;
    otherwise (or when the store is incomplete and require_complete) StoreMismatchError names
    the attribute, the expected and found values. Attributes that break the schema or disagree
    with the arrays' shapes raise StoreCorruptError. FileNotFoundError when nothing is there.
    """
    try:
        return _open_store(path, fingerprint=fingerprint, seed=seed,
                           teacher_sha256=teacher_sha256, require_complete=require_complete)
    except json.JSONDecodeError as error:  # a truncated zarr.json, the group's or an array's
        raise damaged_metadata(path, error) from None


def _open_store(path: str, *, fingerprint: str | None, seed: int | None,
                teacher_sha256: str | None, require_complete: bool) -> "LogitStore":
    try:
        group = zarr.open_group(path, mode="r")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no logit store at {path}; run the dump_logits stage") from error
    attrs = dict(group.attrs)
    expected = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "seed": seed,
                "teacher_sha256": teacher_sha256}
    for key, value in expected.items():
        if value is not None and attrs.get(key) != json_normalise(value):
            raise StoreMismatchError(
                f"logit store {path} does not match: {key} expected {value!r}, found "
                f"{short_repr(attrs.get(key))}. The store was dumped for another dataset, seed, "
                "teacher or store format; rerun dump_logits (dvc repro) to rebuild it.")
    validate_attributes(path, attrs, group)
    if require_complete and not attrs.get("complete"):
        done = int(np.count_nonzero(group[MARKERS][:]))
        raise StoreMismatchError(
            f"logit store {path} is incomplete (complete expected True, found False; "
            f"{done}/{attrs.get('num_shards')} shards written); rerun dump_logits to finish it.")
    return LogitStore(path, group)


class LogitStore:
    """Read side of a logit store; open it with `open_store`."""

    def __init__(self, path: str, group: zarr.Group):
        self.path = path
        self._opened_in, self._group = os.getpid(), group
        self.attributes: dict = dict(group.attrs)
        self.views: int = self.attributes["views"]
        self.rows: int = self.attributes["rows"]
        self.topk: int = self.attributes["topk"]
        self.num_classes: int = self.attributes["num_classes"]
        self.shard_rows: int = self.attributes["shard_rows"]
        self.num_shards: int = self.attributes["num_shards"]
        self.tail: str = self.attributes["tail"]
        self.class_names: list[str] = list(self.attributes["class_names"])
        self.complete: bool = bool(self.attributes.get("complete"))
        self.array_names = view_arrays(self.attributes)
        self._array_handles = {name: group[name] for name in self.array_names}
        self._checksums: dict[int, np.ndarray] = {}
        self._labels: np.ndarray | None = None
        self._tail_basis: TailBasis | None = None

    @property
    def group(self) -> zarr.Group:
        """The store's zarr group, opened again in a process forked after it was opened (a
        DataLoader worker): on object storage the group's client (s3fs's aiohttp session)
        belongs to the event loop of the process that opened it, and a forked worker reading
        through it failed with "attached to a different loop" (tests/test_s3.py)."""
        if self._opened_in != os.getpid():
            self._group = zarr.open_group(self.path, mode="r")
            self._array_handles = {name: self._group[name] for name in self.array_names}
            self._opened_in = os.getpid()
        return self._group

    @property
    def _arrays(self) -> dict:
        self.group  # noqa: B018 (opens it again in a forked process)
        return self._array_handles

    @property
    def tail_basis(self) -> TailBasis | None:
        """The quantised tail's PCA basis (checked, read once), None without a tail."""
        if self._tail_basis is None and has_tail(self.attributes):
            self._tail_basis = read_tail_basis(self.group, self.path)
        return self._tail_basis

    @property
    def exact_logits(self) -> bool:
        """Whether `teacher_logits` gives every class's own logit (k = C or a quantised tail),
        rather than the top-k with the rest filled evenly."""
        return self.topk == self.num_classes or has_tail(self.attributes)

    @property
    def labels(self) -> np.ndarray:
        """(N,) label of every row (0 in shards not written yet), checked against each written
        shard's checksum (read once)."""
        if self._labels is None:
            labels = self._read(self.group["labels"], "labels", slice(None))
            recorded = self._read(self.group[LABEL_CHECKSUMS], LABEL_CHECKSUMS, slice(None))
            for shard_index in sorted(self.completed_shards()):
                start, stop = self.shard_bounds(shard_index)
                if chunk_checksum(labels[start:stop]) != recorded[shard_index]:
                    raise self._corrupt("labels", shard_index)
            self._labels = labels
        return self._labels

    @property
    def temperatures(self) -> list[float]:
        """Temperatures with a stored class prior."""
        return list(self.attributes.get("class_prior_temperatures", []))

    def shard_bounds(self, shard_index: int) -> tuple[int, int]:
        """Global row range [start, stop) of WebDataset shard `shard_index`."""
        return shard_bounds(self.rows, self.shard_rows, shard_index)

    def completed_shards(self) -> set[int]:
        return {int(i) for i in np.flatnonzero(self.group[MARKERS][:])}

    def read_rows(self, view: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) of one view, decoded and checked: one inner chunk per array per
        shard the range touches (one per array when the range is a WebDataset shard).

        Returns topk_log_probs (n, k) float16, descending; topk_classes (n, k) uint;
        logsumexp (n,) float32; with a quantised tail tail_coefficients (n, r) int8 and
        tail_residuals (n, C) int16 (steps of pipeline.store.tail.TAIL_STEP); boxes (n, 4)
        float32; flips (n,) bool. Raises StoreCorruptError on a missing or damaged chunk,
        IndexError outside the store.
        """
        self._check_range(view, start, stop)
        stored = self._read_stored(view, start, stop)
        rows = {**stored, **decode_fields(stored)}
        del rows["topk_codes"]
        rows["boxes"] = decode_boxes(rows["boxes"], self.attributes["encoding"]["box_scale"])
        return rows

    def teacher_logits(self, view: int, start: int, stop: int) -> np.ndarray:
        """(n, C) float32 teacher logits of rows [start, stop) in one view: exact to float16
        for k = C, within half a tail step with a quantised tail, the top-k with the rest
        filled evenly otherwise (`pipeline.store.encoding.teacher_logits_from_fields`)."""
        self._check_range(view, start, stop)
        return decode_logits(self._read_stored(view, start, stop), self.num_classes,
                             self.tail_basis)

    def class_prior(self, temperature: float) -> np.ndarray:
        """(C, C) float32 class prior at `temperature` (row c: mean prediction for label c),
        checked against its recorded checksum."""
        for stored in self.temperatures:
            if math.isclose(stored, float(temperature), rel_tol=1e-9):
                name = prior_name(stored)
                try:
                    array = self.group[PRIOR_GROUP][name]
                except KeyError as error:
                    raise StoreCorruptError(f"logit store {self.path}: array "
                                            f"'{PRIOR_GROUP}/{name}' is listed but missing; "
                                            "rerun dump_logits") from error
                prior = self._read(array, f"{PRIOR_GROUP}/{name}", slice(None))
                recorded = self.attributes.get("class_prior_checksums", {}).get(name)
                if chunk_checksum(prior) != recorded:
                    raise StoreCorruptError(
                        f"logit store {self.path}: array '{PRIOR_GROUP}/{name}' is missing or "
                        "damaged (checksum mismatch); delete the store and rerun dump_logits")
                return prior
        raise ClassPriorNotFoundError(
            f"logit store {self.path} has no class prior at temperature {temperature}; stored "
            f"temperatures: {self.temperatures or 'none'}. Set the IKL GI temperature to one of "
            "them or add it to dump_logits' prior temperatures and rerun it.")

    def _check_range(self, view: int, start: int, stop: int) -> None:
        if not 0 <= view < self.views:
            raise IndexError(f"view {view} out of range: the store has {self.views} views")
        if not 0 <= start < stop <= self.rows:
            raise IndexError(f"rows [{start}, {stop}) out of range: the store has {self.rows} rows")

    def _read_stored(self, view: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) of one view as stored (encoded), checksums verified."""
        parts = [self._read_shard_view(view, shard_index)
                 for shard_index in range(start // self.shard_rows,
                                          (stop - 1) // self.shard_rows + 1)]
        first = (start // self.shard_rows) * self.shard_rows
        return {name: np.concatenate([part[name] for part in parts])[start - first:stop - first]
                for name in parts[0]}

    def _read_shard_view(self, view: int, shard_index: int) -> dict[str, np.ndarray]:
        """Every array's chunk of one view of one shard, as stored, checksums verified."""
        start, stop = self.shard_bounds(shard_index)
        if shard_index not in self._checksums:
            self._checksums[shard_index] = self._read(self.group[CHECKSUMS], CHECKSUMS,
                                                      shard_index)
        recorded = self._checksums[shard_index][view]  # (A,)
        chunks = {}
        for position, name in enumerate(self.array_names):
            chunk = self._read(self._arrays[name], name, (view, slice(start, stop)),
                               shard_index)
            if chunk_checksum(chunk) != recorded[position]:
                raise self._corrupt(name, shard_index, view)
            chunks[name] = chunk
        return chunks

    def _read(self, array, name: str, selection, shard_index: int | None = None) -> np.ndarray:
        try:
            return array[selection]
        # Any failure to decode stored bytes (crc32c mismatch, a truncated Blosc or Zstd frame,
        # a torn shard index) means the same to the user: this chunk is damaged.
        except Exception as error:  # noqa: BLE001
            raise self._corrupt(name, shard_index, detail=f" ({_cause(error)})") from error

    def _corrupt(self, name: str, shard_index: int | None, view: int | None = None,
                 detail: str = "") -> StoreCorruptError:
        where = ""
        if shard_index is not None:
            start, stop = self.shard_bounds(shard_index)
            where = f", shard {shard_index} (rows {start}..{stop - 1}"
            where += f", view {view})" if view is not None else ")"
        return StoreCorruptError(
            f"logit store {self.path}: array {name!r}{where} is missing or damaged (or its "
            f"recorded checksum is){detail}; delete the store and rerun dump_logits")


def _cause(error: Exception) -> str:
    """A decoding error's first sentence, without the raw bytes codecs quote ("Stored:
    b'...'"), which are noise to a reader and were cut mid-escape."""
    text = str(error).split(". Stored:")[0].split("\n")[0]
    if "b'" in text or 'b"' in text or len(text) > 100:
        text = text.split(": b", 1)[0][:100]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
