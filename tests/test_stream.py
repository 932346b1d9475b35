"""Stage two's stream (pipeline.stream) on tiny digits-LT shards and hand-made logit stores.

The stores here are written with pipeline.store directly, with values that name their row and
view (topk_logits[v, r, 0] = 4 r + v, logsumexp[v, r] = r + 1000 v) and boxes drawn under a seed
the stream never sees, so every batch can be checked exactly against the row it claims to be:
its logits, its label and its pixels (the decoded image cropped with the stored box and flip).
Helpers shared with the other stage-two test files live here (imported as `test_stream`).
"""

import json

import numpy as np
import pytest
import torch
import webdataset as wds

from pipeline.augment import CropSpec, apply_view, draw_views
from pipeline.errors import UserError
from pipeline.params import DataParams
from pipeline.shards import prepare_shards
from pipeline.store import (StoreMismatchError, class_id_dtype, create_store, finalize_store,
                            open_store, shard_bounds, write_shard)
from pipeline.stream import (FRESH_VIEW_OFFSET, ViewSource, decode, split_shards,
                             train_loader)

SEED = 0
IMAGE_SIZE = 16
SHARD_SIZE = 16
VIEWS = 3
BOX_SEED = 123  # the store's boxes come from another seed: the stream must replay, not redraw
BOX_SPEC = CropSpec(scale=(0.2, 1.0), flip_probability=0.5)  # flips too, so both are checked


def tiny_data_params(**changes) -> DataParams:
    """digits-LT at 16 px: 86 train rows in shards of 16 (5 full + 1 of 6), 20 val, 1500 test."""
    options = dict(workers=0, shard_size=SHARD_SIZE, image_size=IMAGE_SIZE, val_per_class=2,
                   test_per_class=150)
    return DataParams(**{**options, **changes})


def prepare_tiny_shards(out_dir, **changes) -> dict:
    return prepare_shards(tiny_data_params(**changes), SEED, out_dir)


def train_samples(shards_dir, manifest) -> dict[int, dict]:
    """row -> its train sample as written (encoded), read in row order."""
    samples = wds.WebDataset([s.url for s in split_shards(str(shards_dir), manifest, "train")], shardshuffle=False)
    by_row = {json.loads(sample["json"])["row"]: sample for sample in samples}
    assert list(by_row) == list(range(manifest["splits"]["train"]["rows"]))
    return by_row


def store_attributes(manifest, **changes) -> dict:
    attributes = dict(teacher_name="teacher", teacher_arch="resnet8", teacher_sha256="ab" * 32,
                      teacher_image_size=IMAGE_SIZE, fingerprint=manifest["fingerprint"],
                      class_names=manifest["class_names"], augmentation=BOX_SPEC.as_dict(),
                      seed=SEED)
    return {**attributes, **changes}


def write_row_coded_store(path, manifest, labels, *, views=VIEWS, **attribute_changes) -> dict:
    """A complete store whose values name their (view, row); returns its arrays (V, N, ...)."""
    rows, num_classes = manifest["splits"]["train"]["rows"], manifest["num_classes"]
    row_ids = np.arange(rows)
    view_ids = np.arange(views)[:, None]  # (V, 1)
    first = (4 * row_ids + view_ids).astype(np.float32)  # (V, N): exact in float16 below 2048
    labels = np.asarray(labels, dtype=np.int64)
    classes = np.stack([labels, (labels + 1) % num_classes], axis=-1)  # (N, 2) distinct ids
    boxes, flips = draw_views(BOX_SEED, views, row_ids, IMAGE_SIZE, IMAGE_SIZE, spec=BOX_SPEC)
    arrays = dict(topk_logits=np.stack([first, first - 0.5], axis=-1),  # (V, N, 2) descending
                  topk_classes=np.broadcast_to(classes, (views, rows, 2)).astype(
                      class_id_dtype(num_classes)),
                  logsumexp=(row_ids + 1000 * view_ids).astype(np.float32),  # (V, N)
                  boxes=boxes, flips=flips)
    group = create_store(str(path), rows=rows, views=views, topk=2, num_classes=num_classes,
                         shard_rows=SHARD_SIZE,
                         attributes=store_attributes(manifest, **attribute_changes))
    for index in range(len(manifest["splits"]["train"]["shards"])):
        start, stop = shard_bounds(rows, SHARD_SIZE, index)
        write_shard(group, index, **{name: array[:, start:stop] for name, array in arrays.items()},
                    labels=labels[start:stop])
    uniform = np.full((num_classes, num_classes), 1.0 / num_classes, np.float32)
    finalize_store(group, {1.0: uniform})
    return arrays


def collect(loader) -> dict[str, torch.Tensor]:
    """Every batch of one epoch, concatenated in the order the loader gave them."""
    batches = list(loader)
    return {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "shards"
    manifest = prepare_tiny_shards(out)
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
        # The logits, classes and logsumexp are the stored ones of this row and view.
        # Raw logits again (the store keeps float16 log-probabilities; these are integers).
        expected_first = torch.tensor([4 * row + view for row in rows], dtype=torch.float32)
        assert epoch_data["topk_logits"].dtype == torch.float32
        assert torch.equal(epoch_data["topk_logits"][:, 0], expected_first)
        assert torch.equal(epoch_data["topk_classes"][:, 0], epoch_data["labels"])
        assert torch.equal(epoch_data["logsumexp"],
                           torch.tensor([row + 1000.0 * view for row in rows]))
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
    for position, (image, row) in enumerate(zip(data["images"], rows)):
        view = [2, 0][position % 2]
        assert data["topk_logits"][position, 0].item() == 4 * row + view
        assert data["logsumexp"][position].item() == row + 1000 * view
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
