"""Stage two's stream (pipeline.stream.loader) on tiny digits-LT shards and hand-made logit stores.

The stores here are written with pipeline.store directly, from full logits whose stored fields
name their row and view (top log-probability -(1 + (4 r + v) / 1024), exact in float16;
logsumexp r + 1000 v; a tail that differs per row) and boxes drawn under a seed the stream never
sees, so every batch can be checked exactly against the row it claims to be: its teacher fields
and logits, its label and its pixels (the decoded image cropped with the stored box and flip).
The stores' writer is helpers.stores (test_student writes one too).
"""

import json

import numpy as np
import pytest
import torch
import webdataset as wds

from helpers import IMAGE_SIZE, SEED, prepare_digits
from helpers.stores import BOX_SEED, BOX_SPEC, VIEWS, write_row_coded_store
from pipeline.stream.augment import apply_view, draw_views
from pipeline.errors import UserError
from pipeline.store import (LOGIT_FIELDS, StoreMismatchError, fit_tail_basis, open_store,
                            teacher_logits_from_fields)
from pipeline.store.encoding import decode_fields, encode_logits
from pipeline.store.tail import TAIL_STEP, tail_components
from pipeline.stream.views import FRESH_VIEW_OFFSET, ViewSource
from pipeline.stream.loader import TrainStream, split_shards, train_loader
from pipeline.stream.decode import decode


def train_samples(shards_dir, manifest) -> dict[int, dict]:
    """row -> its train sample as written (encoded), read in row order."""
    samples = wds.WebDataset([s.url for s in split_shards(str(shards_dir), manifest, "train")], shardshuffle=False)
    by_row = {json.loads(sample["json"])["row"]: sample for sample in samples}
    assert list(by_row) == list(range(manifest["splits"]["train"]["rows"]))
    return by_row


def assert_teacher_fields_of(data, positions, rows, views, store, arrays):
    """The teacher fields of batch entries `positions` are the stored ones of (view, row): as
    stored (bit for bit against the store's reader), naming the row, and decoding to the row's
    logits (every class within TAIL_STEP / 2 with a quantised tail)."""
    assert data["topk_log_probs"].dtype == torch.float16
    assert data["topk_classes"].dtype == torch.int64
    assert data["logsumexp"].dtype == torch.float32
    tail_fields = {"tail_coefficients", "tail_residuals"}
    assert tail_fields <= set(LOGIT_FIELDS)
    if store.tail == "quantized":
        assert data["tail_coefficients"].dtype == torch.int8
        assert data["tail_coefficients"].shape[1:] == (store.attributes["tail_components"],)
        assert data["tail_residuals"].dtype == torch.int16  # steps, unzigzagged
        assert data["tail_residuals"].shape[1:] == (store.num_classes,)
    else:
        assert not tail_fields & set(data)
    fields = [name for name in LOGIT_FIELDS if name in data]
    for position, row, view in zip(positions, rows, views):
        stored = store.read_rows(view, row, row + 1)
        for name in fields:
            assert np.array_equal(data[name][position].numpy(),
                                  stored[name][0].astype(data[name].numpy().dtype)), (
                name, row, view)
        assert data["topk_log_probs"][position, 0].item() == -(1 + (4 * row + view) / 1024)
        assert data["topk_log_probs"][position, 1].item() == -(1.5 + (4 * row + view) / 1024)
        assert data["logsumexp"][position].item() == row + 1000 * view
    decoded = teacher_logits_from_fields({name: data[name][positions] for name in fields},
                                         store.num_classes, store.tail_basis).numpy()  # (n, C)
    expected = arrays["logits"][views, rows]  # (n, C)
    if store.tail == "quantized":  # every class within half a step (+ float32 rounding)
        error = np.abs(decoded - expected)
        assert (error <= TAIL_STEP / 2 + 1e-3).all(), error.max()
    else:  # the top-2 exact, the rest filled evenly
        top = np.take_along_axis(expected, data["topk_classes"][positions].numpy(), -1)
        decoded_top = np.take_along_axis(decoded, data["topk_classes"][positions].numpy(), -1)
        np.testing.assert_allclose(decoded_top, top, rtol=0, atol=1e-3)


def collect(loader) -> dict[str, torch.Tensor]:
    """Every batch of one epoch, concatenated in the order the loader gave them."""
    batches = list(loader)
    return {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "shards"
    manifest = prepare_digits(out)
    samples = train_samples(out, manifest)
    labels = np.array([json.loads(samples[row]["json"])["label"] for row in sorted(samples)])
    images = {row: decode(sample) for row, sample in samples.items()}  # (3, 16, 16) uint8
    return str(out), manifest, labels, images


@pytest.fixture(scope="module")
def row_coded_store(shards, tmp_path_factory):
    _, manifest, labels, _ = shards
    path = tmp_path_factory.mktemp("stores") / "coded.zarr"
    arrays = write_row_coded_store(path, manifest, labels)
    return open_store(str(path), fingerprint=manifest["fingerprint"], seed=SEED), arrays


def test_tiny_shards_have_several_shards_and_a_short_last_one(shards):
    _, manifest, labels, _ = shards
    ranges = [s["rows"] for s in manifest["splits"]["train"]["shards"]]
    assert ranges == [[0, 16], [16, 32], [32, 48], [48, 64], [64, 80], [80, 86]]
    assert len(labels) == 86 and set(labels) == set(range(10))


def test_pairing_survives_shuffling_across_shards_and_two_workers(shards, row_coded_store):
    shards_dir, manifest, labels, images = shards
    store, arrays = row_coded_store
    train_shards = split_shards(shards_dir, manifest, "train")
    orders = []
    for epoch in range(VIEWS + 1):  # the last epoch wraps around to view 0
        view = epoch % VIEWS
        views = ViewSource(SEED, epoch, 1, BOX_SPEC, store)
        loader = train_loader(train_shards, views, batch_size=8, image_size=IMAGE_SIZE,
                              workers=2)
        epoch_data = collect(loader)
        rows = epoch_data["rows"].tolist()
        assert sorted(rows) == list(range(86)), f"epoch {epoch}: every row exactly once"
        orders.append(rows)
        assert epoch_data["labels"].tolist() == labels[rows].tolist()
        # The teacher fields (top-k log-probabilities, classes, logsumexp, tail) are the
        # stored ones of this row and view.
        assert torch.equal(epoch_data["topk_classes"][:, 0], epoch_data["labels"])
        assert_teacher_fields_of(epoch_data, list(range(len(rows))), rows, [view] * len(rows),
                                 store, arrays)
        # The pixels are the decoded image under the stored box and flip of view e mod V.
        for image, row in zip(epoch_data["images"], rows):
            expected = apply_view(images[row], arrays["boxes"][view, row],
                                  bool(arrays["flips"][view, row]), IMAGE_SIZE)
            assert torch.equal(image, expected), f"epoch {epoch}, row {row}"
        other = (view + 1) % VIEWS  # the check can tell views apart
        differing = sum(not torch.equal(image, apply_view(
            images[row], arrays["boxes"][other, row], bool(arrays["flips"][other, row]),
            IMAGE_SIZE)) for image, row in zip(epoch_data["images"], rows))
        assert differing > 80
    assert all(order != sorted(order) for order in orders), "samples are shuffled"
    assert len({tuple(order) for order in orders}) == len(orders), "differently every epoch"
    assert arrays["flips"].any() and not arrays["flips"].all()


def test_views_per_decode_yields_m_distinct_stored_views(shards, row_coded_store):
    shards_dir, manifest, labels, images = shards
    store, arrays = row_coded_store
    epoch, m = 1, 2  # views (1 * 2 + j) mod 3 = 2, 0
    views = ViewSource(SEED, epoch, m, BOX_SPEC, store)
    assert views.view_ids() == [2, 0]
    loader = train_loader(split_shards(shards_dir, manifest, "train"), views, batch_size=8,
                          image_size=IMAGE_SIZE, workers=0)
    data = collect(loader)
    rows = data["rows"].tolist()
    assert len(rows) == 2 * 86 and sorted(rows) == sorted(list(range(86)) * 2)
    assert data["labels"].tolist() == labels[rows].tolist()
    # Decode once, use m times: a row's m views follow each other, in view order.
    assert rows[0::2] == rows[1::2]
    assert_teacher_fields_of(data, list(range(len(rows))), rows,
                             [[2, 0][position % 2] for position in range(len(rows))], store,
                             arrays)
    for position, (image, row) in enumerate(zip(data["images"], rows)):
        view = [2, 0][position % 2]
        expected = apply_view(images[row], arrays["boxes"][view, row],
                              bool(arrays["flips"][view, row]), IMAGE_SIZE)
        assert torch.equal(image, expected), f"row {row}, view {view}"
    differing = sum(not torch.equal(a, b) for a, b in zip(data["images"][0::2],
                                                          data["images"][1::2]))
    assert differing > 80  # the m crops of one decode are different images


def test_without_a_store_views_are_drawn_from_the_seed(shards):
    shards_dir, manifest, labels, images = shards
    epoch = 2
    views = ViewSource(SEED, epoch, 1, BOX_SPEC, None)
    data = collect(train_loader(split_shards(shards_dir, manifest, "train"), views,
                                batch_size=16, image_size=IMAGE_SIZE, workers=0))
    rows = data["rows"].tolist()
    assert sorted(rows) == list(range(86))
    assert data["labels"].tolist() == labels[rows].tolist()
    assert set(data) == {"images", "labels", "rows"}
    # Fresh views live past FRESH_VIEW_OFFSET, never among the views a dump caches.
    assert views.view_ids() == [FRESH_VIEW_OFFSET + epoch]
    boxes, flips = draw_views(SEED, views.view_ids(), np.arange(86), IMAGE_SIZE, IMAGE_SIZE,
                              spec=BOX_SPEC)
    for image, row in zip(data["images"], rows):
        assert torch.equal(image, apply_view(images[row], boxes[0, row], bool(flips[0, row]),
                                             IMAGE_SIZE))


def test_a_top_k_only_store_streams_without_tail_fields(shards, tmp_path):
    shards_dir, manifest, labels, _ = shards
    path = tmp_path / "top2.zarr"
    arrays = write_row_coded_store(path, manifest, labels, tail="none")
    store = open_store(str(path), fingerprint=manifest["fingerprint"], seed=SEED)
    assert store.tail == "none" and not store.exact_logits
    view = 1
    data = collect(train_loader(split_shards(shards_dir, manifest, "train"),
                                ViewSource(SEED, view, 1, BOX_SPEC, store), batch_size=16,
                                image_size=IMAGE_SIZE, workers=0))
    rows = data["rows"].tolist()
    assert sorted(rows) == list(range(86))
    assert set(data) == {"images", "labels", "rows", "topk_log_probs", "topk_classes",
                         "logsumexp"}
    assert_teacher_fields_of(data, list(range(86)), rows, [view] * 86, store, arrays)


@pytest.mark.parametrize("workers", [0, 2])
def test_store_with_other_labels_stops_the_stream_naming_the_row(shards, tmp_path, workers):
    shards_dir, manifest, labels, _ = shards
    wrong = labels.copy()
    wrong[37] = (wrong[37] + 1) % 10
    path = tmp_path / "wrong.zarr"
    write_row_coded_store(path, manifest, wrong)
    store = open_store(str(path), fingerprint=manifest["fingerprint"], seed=SEED)
    loader = train_loader(split_shards(shards_dir, manifest, "train"),
                          ViewSource(SEED, 0, 1, BOX_SPEC, store), batch_size=8,
                          image_size=IMAGE_SIZE, workers=workers)
    with pytest.raises(UserError, match=r"row 37 \(label \d\) does not match the logit store"):
        list(loader)


def test_open_store_refuses_another_dataset_seed_or_teacher(shards, row_coded_store):
    _, manifest, _, _ = shards
    path = row_coded_store[0].path
    with pytest.raises(StoreMismatchError, match="fingerprint expected 'other'"):
        open_store(path, fingerprint="other")
    with pytest.raises(StoreMismatchError, match="seed expected 1"):
        open_store(path, fingerprint=manifest["fingerprint"], seed=1)
    with pytest.raises(StoreMismatchError, match="teacher_sha256"):
        open_store(path, teacher_sha256="cd" * 32)


def test_one_stream_serves_every_epoch_from_the_same_workers(shards, row_coded_store):
    """TrainStream (one per run): its 2 workers start once; epoch e gives exactly what a fresh
    one-epoch loader of epoch e gives (rows, order, pixels, teacher fields), each batch's
    tensors written by the worker into shared memory, and epochs differ."""
    shards_dir, manifest, _, _ = shards
    store, _ = row_coded_store
    train_shards = split_shards(shards_dir, manifest, "train")
    stream = TrainStream(train_shards, ViewSource(SEED, 0, 1, BOX_SPEC, store), batch_size=8,
                         image_size=IMAGE_SIZE, workers=2)
    workers, orders = set(), []
    for epoch in (0, 1, 2, 1):
        batches = list(stream.epoch(epoch))
        # a batch that is one worker chunk (not a worker's short last one, merged here)
        assert sum(batch["images"].is_shared() for batch in batches) >= 8
        workers.add(tuple(sorted(w.pid for w in stream.loader._iterator._workers)))
        kept = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
        fresh = collect(train_loader(train_shards, ViewSource(SEED, epoch, 1, BOX_SPEC, store),
                                     batch_size=8, image_size=IMAGE_SIZE, workers=2))
        assert kept.keys() == fresh.keys()
        for key in kept:
            assert torch.equal(kept[key], fresh[key]), (epoch, key)
        assert len(batches) == len(stream.epoch(epoch)) == 11
        orders.append(kept["rows"].tolist())
    assert len(workers) == 1, "the same worker processes served every epoch"
    assert orders[1] == orders[3] and len({tuple(order) for order in orders[:3]}) == 3


def test_a_store_at_inaturalist_scale_streams_exactly(shards):
    """C = 8,142 (iNaturalist-2018): class ids above float16's exact 2,048 come through the
    stream as the integers stored (uint16 -> int64), the tail's int16 coefficients and
    residual steps as stored, and every class decodes within half a tail step. The store is
    a stand-in serving the project's own encoding (a Zarr store at this C also writes a
    265 MB (C, C) class prior, too slow for a unit test; benchmarks/store_size.py writes one)."""
    shards_dir, manifest, labels, _ = shards
    num_classes, rows = 8142, len(labels)
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 3, (rows, num_classes))
    top = num_classes - 1 - 37 * np.arange(rows)  # (N,) ids 8141 .. 4996, above 2048
    logits[np.arange(rows), top] = 20.0
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # (N, C)
    basis = fit_tail_basis(log_probs, tail_components(num_classes))
    stored = encode_logits(logits, 5, basis)
    assert stored["topk_classes"].dtype == np.uint16
    assert stored["tail_coefficients"].dtype == np.int16 and tail_components(num_classes) == 325
    boxes, flips = draw_views(BOX_SEED, 1, np.arange(rows), IMAGE_SIZE, IMAGE_SIZE,
                              spec=BOX_SPEC)
    fields = {**decode_fields(stored), "boxes": boxes[0], "flips": flips[0]}
    row_labels = np.asarray(labels)

    class Store:  # what the stream uses of a LogitStore
        views, path, tail_basis, labels = 1, "inat.zarr", basis, row_labels

        @staticmethod
        def read_rows(view, start, stop):
            return {name: value[start:stop] for name, value in fields.items()}

    data = collect(train_loader(split_shards(shards_dir, manifest, "train"),
                                ViewSource(SEED, 0, 1, BOX_SPEC, Store()), batch_size=32,
                                image_size=IMAGE_SIZE, workers=0))
    order = data["rows"].numpy()
    assert data["topk_classes"].dtype == torch.int64
    assert np.array_equal(data["topk_classes"][:, 0].numpy(), top[order])
    assert data["tail_coefficients"].dtype == torch.int16
    assert data["tail_coefficients"].abs().max() > 127  # the int16 range is used
    for name in ("topk_classes", "tail_coefficients", "tail_residuals", "topk_log_probs"):
        assert np.array_equal(data[name].numpy(), fields[name][order].astype(
            data[name].numpy().dtype)), name
    decoded = teacher_logits_from_fields({name: data[name] for name in LOGIT_FIELDS},
                                         num_classes, basis).numpy()
    error = np.abs(decoded - logits[order])
    assert error.max() <= TAIL_STEP / 2 + 1e-3, error.max()
