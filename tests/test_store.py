"""Tests for pipeline.store on tiny generated stores."""
import math
import os
import warnings

import numpy as np
import pytest
import torch
import zarr

from pipeline.augment import draw_views, pixel_box
from pipeline.errors import UserError
from pipeline.inspect import store_summary
from pipeline.losses import expand_topk, ikl_kd_loss, kl_kd_loss
from pipeline.store import (
    DEFAULT_MAX_IMAGE_SIDE, FORMAT_VERSION, LOGSUMEXP_KEEPBITS, MAX_SUPPORTED_IMAGE_SIDE,
    ClassPriorNotFoundError, StoreMismatchError, array_codecs, box_scale, check_image_sides, class_id_dtype,
    completed_shards, create_store, exact_box_side, finalize_store, open_store, shard_bounds,
    write_shard,
)

ROWS, VIEWS, TOPK, CLASSES, SHARD_ROWS = 25, 3, 5, 10, 10  # shards of 10, 10 and 5 rows
LOGSUMEXP_TOLERANCE = 2.0**-(LOGSUMEXP_KEEPBITS + 1)  # relative, from rounding the mantissa


def store_attributes(num_classes=CLASSES, **changes):
    attributes = dict(teacher_name="teacher_a", teacher_arch="resnet8", teacher_sha256="ab" * 32,
                      teacher_image_size=32, fingerprint="fp-123",
                      class_names=[f"class_{c}" for c in range(num_classes)],
                      augmentation={"scale": [0.08, 1.0], "flip": 0.5}, seed=7)
    attributes.update(changes)
    return attributes


def image_sizes(rows, seed=0):
    """(N,) heights and widths of the rows' source images, odd and varied (the boxes' images)."""
    rng = np.random.default_rng(seed + 100)
    return rng.integers(17, 700, rows), rng.integers(17, 700, rows)


def full_logits(rows, views, num_classes, seed=0):
    """(V, N, C) float32 normal logits with the label's boosted, and the (N,) labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, rows)
    full = rng.normal(0.0, 2.0, (views, rows, num_classes)).astype(np.float32)  # (V, N, C)
    full[:, np.arange(rows), labels] += 6.0
    return full, labels


def make_dump(rows=ROWS, views=VIEWS, topk=TOPK, num_classes=CLASSES, seed=0):
    """Realistic full-store data: top-k of normal logits with the label boosted, exact lse,
    seeded RandomResizedCrop boxes and flips drawn on `image_sizes`."""
    full, labels = full_logits(rows, views, num_classes, seed)
    order = np.argsort(-full, axis=-1, kind="stable")[..., :topk]  # (V, N, k)
    boxes, flips = draw_views(seed, views, np.arange(rows), *image_sizes(rows, seed))
    return dict(
        topk_logits=np.take_along_axis(full, order, -1).astype(np.float32),
        topk_classes=order.astype(class_id_dtype(num_classes)),
        logsumexp=np.log(np.exp(full.astype(np.float64)).sum(-1)).astype(np.float32),
        boxes=boxes, flips=flips, labels=labels.astype(np.int64))


def assert_logits_read_back(read, raw, logsumexp):
    """Raw logits come back as float16 log-probabilities + the stored logsumexp: within half a
    float16 step of (raw - lse) plus the logsumexp's own rounding."""
    assert read.dtype == np.float32
    log_probs = raw.astype(np.float64) - logsumexp[..., None]
    bound = np.abs(log_probs) * 2.0**-11 + np.abs(logsumexp[..., None]) * LOGSUMEXP_TOLERANCE
    assert (np.abs(read - raw) <= bound + 1e-6).all()


def assert_read_back(rows, expected, row_range, seed=0):
    """Ids and flips bitwise; logits and logsumexp within their rounding; boxes to the same
    pixels."""
    assert_logits_read_back(rows["topk_logits"], expected["topk_logits"], expected["logsumexp"])
    for name in ("topk_classes", "flips"):
        assert rows[name].dtype == expected[name].dtype, name
        assert rows[name].tobytes() == expected[name].tobytes(), name
    assert rows["logsumexp"].dtype == np.float32 and rows["boxes"].dtype == np.float32
    np.testing.assert_allclose(rows["logsumexp"], expected["logsumexp"], rtol=LOGSUMEXP_TOLERANCE,
                               atol=0)
    heights, widths = image_sizes(row_range.stop, seed)
    for local, row in enumerate(row_range):
        assert (pixel_box(rows["boxes"][local], heights[row], widths[row])
                == pixel_box(expected["boxes"][local], heights[row], widths[row])), row


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


def test_round_trip_exact_where_lossless_and_within_tolerance_elsewhere(tmp_path):
    _, dump = new_store(tmp_path / "t.zarr")
    store = open_store(str(tmp_path / "t.zarr"), fingerprint="fp-123", seed=7,
                       teacher_sha256="ab" * 32)
    shape = (store.views, store.rows, store.topk, store.num_classes, store.shard_rows)
    assert shape == (3, 25, 5, 10, 10)
    assert store.class_names == [f"class_{c}" for c in range(10)]
    assert store.attributes["augmentation"] == {"scale": [0.08, 1.0], "flip": 0.5}
    assert store.attributes["complete"] is True and store.attributes["format_version"] == FORMAT_VERSION == 2
    assert store.attributes["max_image_side"] == DEFAULT_MAX_IMAGE_SIDE
    np.testing.assert_array_equal(store.labels, dump["labels"])
    assert store.labels.dtype == np.uint8
    for shard_index in range(3):  # includes the short last shard (rows 20..24)
        start, stop = store.shard_bounds(shard_index)
        for view in range(VIEWS):
            expected = {name: array[view, start:stop] for name, array in dump.items()
                        if name != "labels"}
            assert_read_back(store.read_rows(view, start, stop), expected, range(start, stop))
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
    expected = {name: array[2, 7:13] for name, array in dump.items() if name != "labels"}
    assert_read_back(rows, expected, range(7, 13))
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


# ---------------------------------------------------------------------------------------------
# Encodings (pipeline.store.array_codecs): exact where lossless, within tolerance elsewhere.


def written_and_read(values, filters, dtype):
    """`values` written through one zarr array with `filters` (and no compressor), read back."""
    array = zarr.create_array(store=zarr.storage.MemoryStore(), shape=values.shape, dtype=dtype,
                              chunks=values.shape, filters=filters, compressors=None)
    array[...] = values
    return array[...]


@pytest.mark.parametrize("num_classes", [CLASSES, 1000])  # float16 as is; gap-coded
def test_every_float16_logit_round_trips_bitwise(tmp_path, num_classes):
    finite = np.arange(2**16, dtype=np.uint16).view(np.float16)
    finite = np.sort(finite[np.isfinite(finite) & (finite.view(np.uint16) != 0x8000)])[::-1]
    rows = finite[: finite.size // TOPK * TOPK].reshape(1, -1, TOPK)  # descending rows
    codecs = array_codecs("topk_logits", np.float16, topk=TOPK, num_classes=num_classes)
    array = zarr.create_array(store=str(tmp_path / "l.zarr"), shape=rows.shape,
                              dtype=np.float16, chunks=rows.shape, **codecs)
    array[...] = rows
    assert array[...].tobytes() == rows.tobytes()
    assert bool(codecs["filters"]) == (num_classes >= 100)


def test_boxes_replay_to_the_exact_pixel_box_on_every_side_a_scale_covers():
    """Every box value t / H (0 <= t <= H) through the box filter, replayed as pixel_box does:
    for each power-of-two scale up to 4096 every side H up to it, and for the larger scales the
    40 largest sides they cover (the proof in the module docstring covers the rest)."""
    cases = {2**j: range(1, 2**j + 1) for j in range(13)}
    cases.update({scale: range(exact_box_side(scale) - 40, exact_box_side(scale) + 1)
                  for scale in (2**13, 2**14, 2**15)})
    for scale, sides in cases.items():
        assert exact_box_side(scale) == sides[-1] and box_scale(sides[-1]) == scale
        (fixed,) = array_codecs("boxes", np.float32, max_image_side=sides[-1])["filters"]
        heights = np.concatenate([np.full(side + 1, side) for side in sides])  # (M,)
        pixels = np.concatenate([np.arange(side + 1) for side in sides])  # (M,) 0..H per H
        boxes = (pixels / heights).astype(np.float32)  # as draw_views normalises
        read = written_and_read(boxes, [fixed], np.float32)
        assert np.array_equal(np.rint(read.astype(np.float64) * heights), pixels), scale
        assert np.abs(read - boxes).max() <= 0.5 / scale + 2.0**-25, scale
    # one power of two less is not enough: the bound is tight
    (coarse,) = array_codecs("boxes", np.float32, max_image_side=2048)["filters"]
    pixels = np.arange(4096)  # 0..H on a side H = 4095
    read = written_and_read((pixels / 4095).astype(np.float32), [coarse], np.float32)
    assert not np.array_equal(np.rint(read.astype(np.float64) * 4095), pixels)


def test_box_scale_is_the_smallest_exact_power_of_two():
    assert [box_scale(side) for side in (1, 32, 33, 500, 512, 4096, 4097, 16_000, 16_368)] == [
        1, 32, 64, 512, 512, 4096, 8192, 16384, 16384]
    assert box_scale(16_369) == 2**15 and exact_box_side(2**15) == MAX_SUPPORTED_IMAGE_SIDE
    for bad in (0, MAX_SUPPORTED_IMAGE_SIDE + 1, 2.5):
        with pytest.raises(ValueError, match="max_image_side"):
            box_scale(bad)


def test_stored_boxes_replay_exactly_and_images_above_the_stated_side_are_refused(tmp_path):
    rows = 40
    heights, widths = np.full(rows, 512), np.arange(473, 473 + rows)
    boxes, flips = draw_views(3, 2, np.arange(rows), heights, widths)  # (2, 40, 4)
    dump = make_dump(rows=rows, views=2)
    dump.update(boxes=boxes, flips=flips)
    group = create_store(str(tmp_path / "b.zarr"), rows=rows, views=2, topk=TOPK,
                         num_classes=CLASSES, shard_rows=rows,
                         attributes=store_attributes(max_image_side=512))
    assert group.attrs["max_image_side"] == 512
    write_shards(group, dump, [0], rows=rows, shard_rows=rows)
    read = group["boxes"][...]
    assert not np.array_equal(read, boxes)  # quantised: 1/512 steps, not t/H
    assert np.array_equal(read * 512, np.round(read * 512))
    for view in range(2):
        for row in range(rows):
            assert (pixel_box(read[view, row], heights[row], widths[row])
                    == pixel_box(boxes[view, row], heights[row], widths[row]))
    check_image_sides(dict(group.attrs), np.arange(rows), heights, widths)
    with pytest.raises(UserError, match=r"row 7 is 512x513 px, above .* max_image_side of 512"):
        check_image_sides(dict(group.attrs), np.arange(rows), heights, widths + 33)
    with pytest.raises(ValueError, match="attribute 'max_image_side'"):
        create_store(str(tmp_path / "c.zarr"), rows=rows, views=2, topk=TOPK, num_classes=CLASSES,
                     shard_rows=rows, attributes=store_attributes(max_image_side=10**6))


def test_short_last_shard_writes_and_reads_without_warnings(tmp_path):
    """The NaN padding of a short last shard goes through the fixed-point filters silently."""
    dump = make_dump(num_classes=1000)
    group = create_store(str(tmp_path / "w.zarr"), rows=ROWS, views=VIEWS, topk=TOPK,
                         num_classes=1000, shard_rows=SHARD_ROWS,
                         attributes=store_attributes(num_classes=1000))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        write_shards(group, dump, [2])
        rows = open_store(str(tmp_path / "w.zarr"), require_complete=False).read_rows(1, 20, 25)
    expected = {name: array[1, 20:25] for name, array in dump.items() if name != "labels"}
    assert_read_back(rows, expected, range(20, 25))


def synthetic_store(path, rows=2000, views=2, topk=5, num_classes=1000, max_image_side=512):
    """A C = 1000 store like benchmarks/store_size.py's: boxes on 200..500 px images."""
    full, labels = full_logits(rows, views, num_classes, seed=4)
    order = np.argsort(-full, axis=-1, kind="stable")[..., :topk]
    rng = np.random.default_rng(5)
    boxes, flips = draw_views(4, views, np.arange(rows), rng.integers(200, 501, rows),
                              rng.integers(200, 501, rows))
    dump = dict(topk_logits=np.take_along_axis(full, order, -1).astype(np.float16),
                topk_classes=order.astype(class_id_dtype(num_classes)),
                logsumexp=np.log(np.exp(full.astype(np.float64)).sum(-1)).astype(np.float32),
                boxes=boxes, flips=flips, labels=labels)
    group = create_store(str(path), rows=rows, views=views, topk=topk, num_classes=num_classes,
                         shard_rows=1000, attributes=store_attributes(
                             num_classes=num_classes, max_image_side=max_image_side))
    write_shards(group, dump, range(math.ceil(rows / 1000)), rows=rows, shard_rows=1000)
    finalize_store(group, {1.0: np.full((num_classes, num_classes), 1 / num_classes, np.float32)})
    return full, dump


def test_bytes_per_view_at_k5_below_the_goal_on_realistic_synthetic_data(tmp_path):
    """<= 20 B per view at k = 5, C = 1000, box and flip included, for images up to 512 px
    (benchmarks/store_size.py measures more: k = 10, 100, C, and the default image side)."""
    synthetic_store(tmp_path / "s.zarr")
    summary = store_summary(open_store(str(tmp_path / "s.zarr")))
    assert summary["raw_bytes_per_view"] == 41
    assert summary["bytes_per_view"] <= 20.0, summary["bytes_per_view"]


def test_loss_from_the_read_back_store_matches_the_uncompressed_top_k(tmp_path):
    """logsumexp is the only lossy input of the losses: IKL-KD and KL-KD move by << 0.5 %."""
    full, dump = synthetic_store(tmp_path / "s.zarr", rows=1000, views=1, topk=10)
    store = open_store(str(tmp_path / "s.zarr"))
    read = store.read_rows(0, 0, 1000)
    student = torch.from_numpy(full[0]) + torch.randn(1000, 1000, generator=torch.manual_seed(0))

    def losses(arrays):
        teacher = expand_topk(torch.from_numpy(arrays["topk_logits"]),
                              torch.from_numpy(arrays["topk_classes"].astype(np.int64)),
                              torch.from_numpy(arrays["logsumexp"]), 1000)
        return np.array([float(ikl_kd_loss(student, teacher, alpha=1.0, beta=1.0)),
                         float(kl_kd_loss(student, teacher, temperature=1.0))])

    written = losses({name: array[0] for name, array in dump.items() if name != "labels"})
    np.testing.assert_allclose(losses(read), written, rtol=1e-4)
