"""Tests for pipeline.store on tiny generated stores."""
import os

import numpy as np
import pytest
import zarr

from pipeline.store import (
    ClassPriorNotFoundError, StoreMismatchError, class_id_dtype, completed_shards, create_store,
    finalize_store, open_store, shard_bounds, write_shard,
)

ROWS, VIEWS, TOPK, CLASSES, SHARD_ROWS = 25, 3, 5, 10, 10  # shards of 10, 10 and 5 rows


def store_attributes(num_classes=CLASSES, **changes):
    attributes = dict(teacher_name="teacher_a", teacher_arch="resnet8", teacher_sha256="ab" * 32,
                      teacher_image_size=32, fingerprint="fp-123",
                      class_names=[f"class_{c}" for c in range(num_classes)],
                      augmentation={"scale": [0.08, 1.0], "flip": 0.5}, seed=7)
    attributes.update(changes)
    return attributes


def make_dump(rows=ROWS, views=VIEWS, topk=TOPK, num_classes=CLASSES, seed=0):
    """Realistic full-store data: top-k of normal logits with the label boosted, exact lse."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, rows)
    full = rng.normal(0.0, 2.0, (views, rows, num_classes)).astype(np.float32)  # (V, N, C)
    full[:, np.arange(rows), labels] += 6.0
    order = np.argsort(-full, axis=-1, kind="stable")[..., :topk]  # (V, N, k)
    boxes = rng.uniform(0.0, 0.5, (views, rows, 4)).astype(np.float32)
    return dict(
        topk_logits=np.take_along_axis(full, order, -1).astype(np.float16),
        topk_classes=order.astype(class_id_dtype(num_classes)),
        logsumexp=np.log(np.exp(full.astype(np.float64)).sum(-1)).astype(np.float32),
        boxes=boxes, flips=rng.random((views, rows)) < 0.5, labels=labels.astype(np.int64))


def shard_slice(dump, start, stop):
    return {name: (array[start:stop] if name == "labels" else array[:, start:stop])
            for name, array in dump.items()}


def write_shards(group, dump, shard_indices, rows=ROWS, shard_rows=SHARD_ROWS):
    for shard_index in shard_indices:
        start, stop = shard_bounds(rows, shard_rows, shard_index)
        write_shard(group, shard_index, **shard_slice(dump, start, stop))


def priors(num_classes=CLASSES):
    rng = np.random.default_rng(1)
    return {1.0: rng.dirichlet(np.ones(num_classes), num_classes).astype(np.float32),
            4.0: np.full((num_classes, num_classes), 1.0 / num_classes, np.float32)}


def new_store(path, dump=None, shards=(0, 1, 2), finalize=True, **attribute_changes):
    dump = make_dump() if dump is None else dump
    group = create_store(str(path), rows=ROWS, views=VIEWS, topk=TOPK, num_classes=CLASSES,
                         shard_rows=SHARD_ROWS, attributes=store_attributes(**attribute_changes))
    write_shards(group, dump, shards)
    if finalize:
        finalize_store(group, priors())
    return group, dump


def test_round_trip_all_arrays_bitwise(tmp_path):
    _, dump = new_store(tmp_path / "t.zarr")
    store = open_store(str(tmp_path / "t.zarr"), fingerprint="fp-123", seed=7,
                       teacher_sha256="ab" * 32)
    shape = (store.views, store.rows, store.topk, store.num_classes, store.shard_rows)
    assert shape == (3, 25, 5, 10, 10)
    assert store.class_names == [f"class_{c}" for c in range(10)]
    assert store.attributes["augmentation"] == {"scale": [0.08, 1.0], "flip": 0.5}
    assert store.attributes["complete"] is True and store.attributes["format_version"] == 1
    np.testing.assert_array_equal(store.labels, dump["labels"])
    assert store.labels.dtype == np.uint8
    for shard_index in range(3):  # includes the short last shard (rows 20..24)
        start, stop = store.shard_bounds(shard_index)
        for view in range(VIEWS):
            rows = store.read_rows(view, start, stop)
            for name in ("topk_logits", "topk_classes", "logsumexp", "boxes", "flips"):
                expected = dump[name][view, start:stop]
                assert rows[name].dtype == expected.dtype, name
                assert rows[name].tobytes() == expected.tobytes(), name
    assert store.shard_bounds(2) == (20, 25)


@pytest.mark.parametrize("num_classes, dtype", [
    (10, np.uint8), (256, np.uint8), (257, np.uint16), (1000, np.uint16), (70000, np.uint32)])
def test_class_id_dtype_is_smallest_unsigned(num_classes, dtype):
    assert class_id_dtype(num_classes) == np.dtype(dtype)


def test_store_with_1000_classes_uses_uint16(tmp_path):
    group = create_store(str(tmp_path / "c.zarr"), rows=4, views=1, topk=5, num_classes=1000,
                         shard_rows=4, attributes=store_attributes(num_classes=1000))
    assert group["topk_classes"].dtype == np.uint16 and group["labels"].dtype == np.uint16
    dump = make_dump(rows=4, views=1, num_classes=1000)
    write_shards(group, dump, [0], rows=4, shard_rows=4)
    np.testing.assert_array_equal(group["topk_classes"][:], dump["topk_classes"])


def test_read_rows_returns_exactly_the_requested_rows(tmp_path):
    _, dump = new_store(tmp_path / "t.zarr")
    store = open_store(str(tmp_path / "t.zarr"))
    rows = store.read_rows(2, 7, 13)  # crosses the shard boundary at row 10
    assert rows["topk_logits"].shape == (6, TOPK) and rows["boxes"].shape == (6, 4)
    assert rows["logsumexp"].shape == (6,) and rows["flips"].shape == (6,)
    for name in ("topk_logits", "topk_classes", "logsumexp", "boxes", "flips"):
        np.testing.assert_array_equal(rows[name], dump[name][2, 7:13])
    with pytest.raises(IndexError, match="view 3"):
        store.read_rows(3, 0, 1)
    with pytest.raises(IndexError, match="rows"):
        store.read_rows(0, 20, 26)


def test_one_shard_object_per_row_shard_holding_all_views(tmp_path):
    group, _ = new_store(tmp_path / "t.zarr")
    for name, trailing in [("topk_logits", (TOPK,)), ("topk_classes", (TOPK,)),
                           ("logsumexp", ()), ("boxes", (4,)), ("flips", ())]:
        array = group[name]
        assert array.shards == (VIEWS, SHARD_ROWS) + trailing, name
        assert array.chunks == (1, SHARD_ROWS) + trailing, name
        chunk_dir = tmp_path / "t.zarr" / name / "c"
        objects = sorted(os.path.relpath(os.path.join(root, file), chunk_dir)
                         for root, _, files in os.walk(chunk_dir) for file in files)
        # keys are c/<view shard>/<row shard>[/<k shard>]: one view shard, three row shards
        row_shards = [key.split(os.sep)[:2] for key in objects]
        assert row_shards == [["0", "0"], ["0", "1"], ["0", "2"]], name
    markers = sorted(os.listdir(tmp_path / "t.zarr" / "shard_complete" / "c"))
    assert markers == ["0", "1", "2"]


@pytest.mark.parametrize("name, value, message", [
    ("topk_logits", np.nan, "non-finite topk_logits at global row 13, view 1"),
    ("topk_logits", 1e6, "non-finite topk_logits (overflows float16) at global row 13, view 1"),
    ("logsumexp", np.inf, "non-finite logsumexp at global row 13, view 1"),
])
def test_non_finite_values_refused_naming_row_and_view(tmp_path, name, value, message):
    group = create_store(str(tmp_path / "t.zarr"), rows=ROWS, views=VIEWS, topk=TOPK,
                         num_classes=CLASSES, shard_rows=SHARD_ROWS, attributes=store_attributes())
    shard = shard_slice(make_dump(), 10, 20)
    shard["topk_logits"] = shard["topk_logits"].astype(np.float32)
    shard[name][1, 3] = value  # view 1, local row 3 of shard 1 = global row 13
    with pytest.raises(ValueError) as error:
        write_shard(group, 1, **shard)
    assert message in str(error.value)
    assert completed_shards(group) == set()


def test_write_shard_validates_shapes_dtypes_and_order(tmp_path):
    group = create_store(str(tmp_path / "t.zarr"), rows=ROWS, views=VIEWS, topk=TOPK,
                         num_classes=CLASSES, shard_rows=SHARD_ROWS, attributes=store_attributes())
    dump = make_dump()
    message = r"topk_logits has shape \(3, 10, 5\), expected \(3, 5, 5\)"
    with pytest.raises(ValueError, match=message):
        write_shard(group, 2, **shard_slice(dump, 10, 20))  # shard 2 holds 5 rows
    shard = shard_slice(dump, 0, 10)
    with pytest.raises(ValueError, match="flips has dtype"):
        write_shard(group, 0, **{**shard, "flips": shard["flips"].astype(np.float32)})
    reversed_logits = shard["topk_logits"][..., ::-1]
    with pytest.raises(ValueError, match="not descending at global row 0, view 0"):
        write_shard(group, 0, **{**shard, "topk_logits": reversed_logits})
    with pytest.raises(ValueError, match="class id outside"):
        write_shard(group, 0, **{**shard, "topk_classes": shard["topk_classes"] + 10})
    with pytest.raises(IndexError, match="shard 3 out of range"):
        write_shard(group, 3, **shard)
    assert completed_shards(group) == set()


def test_resume_after_crash_matches_uninterrupted_store(tmp_path):
    dump = make_dump()
    new_store(tmp_path / "straight.zarr", dump)
    group, _ = new_store(tmp_path / "resumed.zarr", dump, shards=(0, 1), finalize=False)
    del group  # "crash"
    group = create_store(str(tmp_path / "resumed.zarr"), rows=ROWS, views=VIEWS, topk=TOPK,
                         num_classes=CLASSES, shard_rows=SHARD_ROWS, attributes=store_attributes())
    assert completed_shards(group) == {0, 1}
    write_shards(group, dump, [2])
    finalize_store(group, priors())
    straight = zarr.open_group(str(tmp_path / "straight.zarr"), mode="r")
    resumed = zarr.open_group(str(tmp_path / "resumed.zarr"), mode="r")
    assert dict(straight.attrs) == dict(resumed.attrs)
    names = ["topk_logits", "topk_classes", "logsumexp", "boxes", "flips", "labels",
             "shard_complete", "class_prior/T=1.0", "class_prior/T=4.0"]
    for name in names:
        assert straight[name][...].tobytes() == resumed[name][...].tobytes(), name


def test_create_store_refuses_different_attributes_or_complete_store(tmp_path):
    path = str(tmp_path / "t.zarr")
    new_store(path, shards=(0,), finalize=False)
    kwargs = dict(rows=ROWS, views=VIEWS, topk=TOPK, num_classes=CLASSES, shard_rows=SHARD_ROWS)
    message = "different 'seed': it has 7, this dump asks for 8"
    with pytest.raises(StoreMismatchError, match=message):
        create_store(path, **kwargs, attributes=store_attributes(seed=8))
    with pytest.raises(StoreMismatchError, match="different 'topk'.*Delete"):
        create_store(path, **{**kwargs, "topk": 4}, attributes=store_attributes())
    group = create_store(path, **kwargs, attributes=store_attributes(seed=8), overwrite=True)
    assert completed_shards(group) == set() and group.attrs["seed"] == 8
    write_shards(group, make_dump(), [0, 1, 2])
    finalize_store(group, priors())
    with pytest.raises(StoreMismatchError, match="already complete"):
        create_store(path, **kwargs, attributes=store_attributes(seed=8))


def test_create_store_requires_attributes(tmp_path):
    attributes = store_attributes()
    del attributes["teacher_sha256"]
    with pytest.raises(ValueError, match="teacher_sha256"):
        create_store(str(tmp_path / "t.zarr"), rows=ROWS, views=VIEWS, topk=TOPK,
                     num_classes=CLASSES, shard_rows=SHARD_ROWS, attributes=attributes)


def test_open_store_refuses_incomplete_and_mismatched_stores(tmp_path):
    new_store(tmp_path / "partial.zarr", shards=(0, 2), finalize=False)
    with pytest.raises(StoreMismatchError, match=r"incomplete.*2/3 shards.*rerun dump_logits"):
        open_store(str(tmp_path / "partial.zarr"))
    assert open_store(str(tmp_path / "partial.zarr"), require_complete=False).complete is False
    new_store(tmp_path / "t.zarr")
    cases = [(dict(fingerprint="fp-999"), "fingerprint expected 'fp-999', found 'fp-123'"),
             (dict(seed=8), "seed expected 8, found 7"),
             (dict(teacher_sha256="cd" * 32), f"teacher_sha256 expected '{'cd' * 32}', found")]
    for kwargs, message in cases:
        with pytest.raises(StoreMismatchError) as error:
            open_store(str(tmp_path / "t.zarr"), **kwargs)
        assert message in str(error.value) and "rerun dump_logits" in str(error.value)
        assert isinstance(error.value, ValueError)
    with pytest.raises(FileNotFoundError, match="no logit store"):
        open_store(str(tmp_path / "missing.zarr"))


def test_finalize_refuses_missing_shard(tmp_path):
    group, _ = new_store(tmp_path / "t.zarr", shards=(0, 2), finalize=False)
    with pytest.raises(ValueError, match=r"1 of 3 shards are not written \(shards 1\)"):
        finalize_store(group, priors())
    assert group.attrs["complete"] is False


def test_class_prior_by_temperature(tmp_path):
    new_store(tmp_path / "t.zarr")
    store = open_store(str(tmp_path / "t.zarr"))
    expected = priors()
    assert store.temperatures == [1.0, 4.0]
    np.testing.assert_array_equal(store.class_prior(1.0), expected[1.0])
    np.testing.assert_array_equal(store.class_prior(4), expected[4.0])
    assert store.class_prior(4).dtype == np.float32 and store.class_prior(4).shape == (10, 10)
    with pytest.raises(ClassPriorNotFoundError, match=r"temperature 2.0.*\[1.0, 4.0\]"):
        store.class_prior(2.0)
    with pytest.raises(KeyError):
        store.class_prior(2.0)
