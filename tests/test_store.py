"""Tests for pipeline.store on tiny generated stores: round trips, the quantised tail, the
one teacher-logits reader, integrity (checksums, attribute schema) and spec-only codecs."""
import math
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
import zarr

from pipeline.stream.augment import draw_views, pixel_box
from pipeline.errors import UserError
from pipeline.tools.inspect import store_summary
from pipeline.train.losses import ikl_kd_loss, kl_kd_loss
from pipeline.store import (
    DEFAULT_MAX_IMAGE_SIDE, FORMAT_VERSION, LOGSUMEXP_KEEPBITS, MAX_SUPPORTED_IMAGE_SIDE,
    ClassPriorNotFoundError, StoreCorruptError, StoreMismatchError, box_scale, check_image_sides,
    class_id_dtype, completed_shards, create_store, exact_box_side, finalize_store, open_store,
    shard_bounds, verify_store, write_shard)
from pipeline.store import fit_tail_basis, write_tail_basis
from pipeline.store.encoding import (
    decode_boxes, encode_boxes, gap_decode, gap_encode, round_mantissa)
from pipeline.store.tail import TAIL_STEP, tail_components

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


def make_dump(rows=ROWS, views=VIEWS, num_classes=CLASSES, seed=0, spread=2.0):
    """(V, N, C) float32 normal logits with the label's boosted, seeded RandomResizedCrop boxes
    and flips drawn on `image_sizes`, and the (N,) labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, rows)
    logits = rng.normal(0.0, spread, (views, rows, num_classes)).astype(np.float32)
    logits[:, np.arange(rows), labels] += 6.0
    boxes, flips = draw_views(seed, views, np.arange(rows), *image_sizes(rows, seed))
    return dict(logits=logits, boxes=boxes, flips=flips, labels=labels.astype(np.int64))


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


def new_store(path, dump=None, shards=(0, 1, 2), finalize=True, tail="none", topk=TOPK,
              num_classes=CLASSES, **attribute_changes):
    dump = make_dump(num_classes=num_classes) if dump is None else dump
    group = create_store(str(path), rows=ROWS, views=VIEWS, topk=topk, num_classes=num_classes,
                         shard_rows=SHARD_ROWS, tail=tail,
                         attributes=store_attributes(num_classes, **attribute_changes))
    if tail == "quantized" and "tail_mean" not in group:
        write_tail_basis(group, fitted_basis(dump))
    write_shards(group, dump, shards)
    if finalize:
        finalize_store(group, priors(num_classes))
    return group, dump


def fitted_basis(dump):
    """The tail basis as the dump fits it: on view 0's log-probabilities."""
    num_classes = dump["logits"].shape[-1]
    return fit_tail_basis(log_softmax64(dump["logits"][0]), tail_components(num_classes))


def log_softmax64(logits):
    logits = logits.astype(np.float64)
    peak = logits.max(-1, keepdims=True)
    return logits - peak - np.log(np.exp(logits - peak).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_exact_where_lossless_and_within_tolerance_elsewhere(tmp_path):
    _, dump = new_store(tmp_path / "t.zarr")
    store = open_store(str(tmp_path / "t.zarr"), fingerprint="fp-123", seed=7,
                       teacher_sha256="ab" * 32)
    assert (store.views, store.rows, store.topk, store.num_classes, store.shard_rows) == (
        3, 25, 5, 10, 10)
    assert store.class_names == [f"class_{c}" for c in range(10)]
    assert store.attributes["complete"] is True and store.attributes["format_version"] == 3
    assert FORMAT_VERSION == 3 and store.attributes["max_image_side"] == DEFAULT_MAX_IMAGE_SIDE
    np.testing.assert_array_equal(store.labels, dump["labels"])
    assert store.labels.dtype == np.uint8
    heights, widths = image_sizes(ROWS)
    for shard_index in range(3):  # includes the short last shard (rows 20..24)
        start, stop = store.shard_bounds(shard_index)
        for view in range(VIEWS):
            rows = store.read_rows(view, start, stop)
            log_probs = log_softmax64(dump["logits"][view, start:stop])  # (n, C)
            order = np.argsort(-log_probs, axis=-1, kind="stable")[:, :TOPK]
            np.testing.assert_array_equal(rows["topk_classes"], order)
            expected = np.take_along_axis(log_probs, order, -1).astype(np.float16)
            assert rows["topk_log_probs"].tobytes() == (expected + np.float16(0)).tobytes()
            lse = np.log(np.exp(dump["logits"][view, start:stop].astype(np.float64)).sum(-1))
            np.testing.assert_allclose(rows["logsumexp"], lse, rtol=LOGSUMEXP_TOLERANCE, atol=0)
            np.testing.assert_array_equal(rows["flips"], dump["flips"][view, start:stop])
            for local, row in enumerate(range(start, stop)):
                assert (pixel_box(rows["boxes"][local], heights[row], widths[row])
                        == pixel_box(dump["boxes"][view, row], heights[row], widths[row]))


@pytest.mark.parametrize("num_classes, dtype", [
    (10, np.uint8), (256, np.uint8), (257, np.uint16), (1000, np.uint16), (70000, np.uint32)])
def test_class_id_dtype_is_smallest_unsigned(num_classes, dtype):
    assert class_id_dtype(num_classes) == np.dtype(dtype)


def test_read_rows_returns_exactly_the_requested_rows(tmp_path):
    new_store(tmp_path / "t.zarr", tail="quantized")
    store = open_store(str(tmp_path / "t.zarr"))
    rows = store.read_rows(2, 7, 13)  # crosses the shard boundary at row 10
    assert rows["topk_log_probs"].shape == (6, TOPK) and rows["boxes"].shape == (6, 4)
    assert rows["tail_residuals"].shape == (6, CLASSES) and rows["tail_residuals"].dtype == np.int16
    assert rows["tail_coefficients"].shape == (6, tail_components(CLASSES))
    whole = [store.read_rows(2, 0, 10), store.read_rows(2, 10, 20)]
    for name, values in rows.items():
        joined = np.concatenate([whole[0][name], whole[1][name]])[7:13]
        assert values.tobytes() == joined.tobytes(), name
    with pytest.raises(IndexError, match="view 3"):
        store.read_rows(3, 0, 1)
    with pytest.raises(IndexError, match="rows"):
        store.read_rows(0, 20, 26)


def test_one_shard_object_per_row_shard_holding_all_views(tmp_path):
    group, _ = new_store(tmp_path / "t.zarr", tail="quantized")
    for name, trailing in [("topk_codes", (TOPK,)), ("topk_classes", (TOPK,)),
                           ("logsumexp", ()), ("tail_coefficients", (tail_components(CLASSES),)),
                           ("tail_residuals", (CLASSES,)),
                           ("boxes", (4,)), ("flips", ())]:
        array = group[name]
        assert array.shards == (VIEWS, SHARD_ROWS) + trailing, name
        assert array.chunks == (1, SHARD_ROWS) + trailing, name
        chunk_dir = tmp_path / "t.zarr" / name / "c"
        objects = sorted(os.path.relpath(os.path.join(root, file), chunk_dir)
                         for root, _, files in os.walk(chunk_dir) for file in files)
        row_shards = [key.split(os.sep)[:2] for key in objects]
        assert row_shards == [["0", "0"], ["0", "1"], ["0", "2"]], name
    assert sorted(os.listdir(tmp_path / "t.zarr" / "shard_complete" / "c")) == ["0", "1", "2"]


def test_every_float16_log_probability_round_trips_through_the_gap_code():
    finite = np.arange(2**16, dtype=np.uint16).view(np.float16)
    log_probs = np.sort(finite[np.isfinite(finite) & (finite <= 0)])[::-1]  # 0 .. -65504
    rows = log_probs[: log_probs.size // TOPK * TOPK].reshape(-1, TOPK)  # descending rows
    codes = gap_encode(rows)
    assert codes.dtype == np.uint16
    assert (codes[:, 1:] < 2**15).all()  # gaps, not values
    assert gap_decode(codes).tobytes() == (rows + np.float16(0)).tobytes()


def test_logsumexp_keeps_its_mantissa_bits():
    values = np.random.default_rng(0).normal(0, 30, 10_000).astype(np.float32)
    rounded = round_mantissa(values, LOGSUMEXP_KEEPBITS)
    assert (rounded.view(np.uint32) & np.uint32(2**(23 - LOGSUMEXP_KEEPBITS) - 1) == 0).all()
    assert np.abs(rounded / values - 1).max() <= LOGSUMEXP_TOLERANCE


# ---------------------------------------------------------------------------------------------
# The one reader of full teacher logits


def test_teacher_logits_exact_to_float16_when_every_class_is_kept(tmp_path):
    _, dump = new_store(tmp_path / "t.zarr", topk=CLASSES)
    store = open_store(str(tmp_path / "t.zarr"))
    assert store.exact_logits
    read = store.teacher_logits(1, 0, ROWS)  # (N, C)
    log_probs = log_softmax64(dump["logits"][1])
    lse = dump["logits"][1].astype(np.float64) - log_probs
    bound = np.abs(log_probs) * 2.0**-11 + np.abs(lse) * LOGSUMEXP_TOLERANCE + 1e-6
    assert read.dtype == np.float32 and read.shape == (ROWS, CLASSES)
    assert (np.abs(read - dump["logits"][1]) <= bound).all()


def test_quantised_tail_brings_every_class_back_within_half_a_step(tmp_path):
    """A known teacher, C = 50, k = 5: every class within TAIL_STEP / 2, the top-k exact."""
    _, dump = new_store(tmp_path / "q.zarr", tail="quantized", num_classes=50, spread=3.0)
    store = open_store(str(tmp_path / "q.zarr"))
    assert store.tail == "quantized" and store.exact_logits
    assert store.attributes["tail_components"] == tail_components(50) == 8
    for view in range(VIEWS):
        read = store.teacher_logits(view, 0, ROWS).astype(np.float64)  # (N, C)
        rows = store.read_rows(view, 0, ROWS)
        log_probs = log_softmax64(dump["logits"][view])
        lse = rows["logsumexp"].astype(np.float64)[:, None]
        error = np.abs((read - lse) - log_probs)  # (N, C), in log-probability
        assert (error <= TAIL_STEP / 2 + 1e-5).all()
        assert error.mean() > TAIL_STEP / 10  # lossy indeed: the bound is not vacuous
        top = np.take_along_axis(error, rows["topk_classes"].astype(np.int64), -1)
        assert (top <= np.abs(log_probs).max() * 2**-11 + 1e-6).all()  # top-k: float16 exact


def test_tail_none_gives_the_even_fill(tmp_path):
    _, dump = new_store(tmp_path / "n.zarr", tail="none", num_classes=50)
    store = open_store(str(tmp_path / "n.zarr"))
    assert not store.exact_logits
    rows = store.read_rows(0, 0, ROWS)
    read = store.teacher_logits(0, 0, ROWS).astype(np.float64)
    top = rows["topk_log_probs"].astype(np.float64)  # (N, k)
    lse = rows["logsumexp"].astype(np.float64)[:, None]
    residual = np.clip(np.minimum(1 - np.exp(top).sum(1, keepdims=True),
                                  45 * np.exp(top[:, -1:])), 1e-12, None)
    expected = np.repeat(lse + np.log(residual / 45), 50, axis=1)
    np.put_along_axis(expected, rows["topk_classes"].astype(np.int64), top + lse, -1)
    np.testing.assert_allclose(read, expected, rtol=0, atol=2e-5)


def test_ikl_and_kl_from_the_quantised_store_match_the_original_logits(tmp_path):
    """The issue's goals on a known teacher (C = 50, k = 5), student = teacher + N(0, 1):
    IKL-KD loss < 0.5 %, gradient < 1 %; KL-KD loss and gradient < 0.5 %."""
    _, dump = new_store(tmp_path / "q.zarr", tail="quantized", num_classes=50, spread=3.0)
    store = open_store(str(tmp_path / "q.zarr"))
    original = torch.from_numpy(dump["logits"].reshape(-1, 50)).double()  # (V N, C)
    cached = torch.from_numpy(np.concatenate(
        [store.teacher_logits(view, 0, ROWS) for view in range(VIEWS)])).double()
    student = original + torch.randn(original.shape, generator=torch.manual_seed(0),
                                     dtype=torch.float64)

    def loss_and_gradient(loss, teacher):
        s = student.clone().requires_grad_(True)
        value = loss(s, teacher)
        value.backward()
        value = value.detach()
        return value.item(), s.grad

    for name, loss, bound in [
            ("ikl", lambda s, t: ikl_kd_loss(s, t, alpha=1.0, beta=1.0), 0.01),
            ("kl", lambda s, t: kl_kd_loss(s, t, temperature=1.0), 0.005)]:
        value, gradient = loss_and_gradient(loss, original)
        cached_value, cached_gradient = loss_and_gradient(loss, cached)
        assert abs(cached_value / value - 1) < 0.005, name
        relative = float((cached_gradient - gradient).norm() / gradient.norm())
        assert relative < bound, (name, relative)


# ---------------------------------------------------------------------------------------------
# Writing: refusals, resume, identity


def test_non_finite_logits_refused_naming_row_and_view(tmp_path):
    group = create_store(str(tmp_path / "t.zarr"), rows=ROWS, views=VIEWS, topk=TOPK,
                         num_classes=CLASSES, shard_rows=SHARD_ROWS, attributes=store_attributes())
    shard = shard_slice(make_dump(), 10, 20)
    shard["logits"][1, 3, 4] = np.nan  # view 1, local row 3 of shard 1 = global row 13
    with pytest.raises(ValueError, match="non-finite logits at global row 13, view 1"):
        write_shard(group, 1, **shard)
    assert completed_shards(group) == set()


def test_write_shard_validates_shapes_dtypes_and_ranges(tmp_path):
    group = create_store(str(tmp_path / "t.zarr"), rows=ROWS, views=VIEWS, topk=TOPK,
                         num_classes=CLASSES, shard_rows=SHARD_ROWS, attributes=store_attributes())
    dump = make_dump()
    with pytest.raises(ValueError, match=r"logits has shape \(3, 10, 10\), expected \(3, 5, 10\)"):
        write_shard(group, 2, **shard_slice(dump, 10, 20))  # shard 2 holds 5 rows
    shard = shard_slice(dump, 0, 10)
    with pytest.raises(ValueError, match="flips has dtype"):
        write_shard(group, 0, **{**shard, "flips": shard["flips"].astype(np.float32)})
    with pytest.raises(ValueError, match="label outside"):
        write_shard(group, 0, **{**shard, "labels": shard["labels"] + 10})
    with pytest.raises(ValueError, match="crop box outside"):
        write_shard(group, 0, **{**shard, "boxes": shard["boxes"] + 1})
    with pytest.raises(IndexError, match="shard 3 out of range"):
        write_shard(group, 3, **shard)
    assert completed_shards(group) == set()


def test_resume_after_crash_matches_uninterrupted_store(tmp_path):
    dump = make_dump()
    new_store(tmp_path / "straight.zarr", dump, tail="quantized")
    group, _ = new_store(tmp_path / "resumed.zarr", dump, shards=(0, 1), finalize=False,
                         tail="quantized")
    del group  # "crash"
    group = create_store(str(tmp_path / "resumed.zarr"), rows=ROWS, views=VIEWS, topk=TOPK,
                         num_classes=CLASSES, shard_rows=SHARD_ROWS, tail="quantized",
                         attributes=store_attributes())
    assert completed_shards(group) == {0, 1}
    write_shards(group, dump, [2])
    finalize_store(group, priors())
    straight = zarr.open_group(str(tmp_path / "straight.zarr"), mode="r")
    resumed = zarr.open_group(str(tmp_path / "resumed.zarr"), mode="r")
    assert dict(straight.attrs) == dict(resumed.attrs)
    names = ["topk_codes", "topk_classes", "logsumexp", "tail_coefficients", "tail_residuals",
             "tail_mean", "tail_basis", "tail_scales", "boxes", "flips", "labels", "checksums",
             "label_checksums", "shard_complete", "class_prior/T=1.0", "class_prior/T=4.0"]
    for name in names:
        assert straight[name][...].tobytes() == resumed[name][...].tobytes(), name


def test_create_store_refuses_different_attributes_or_complete_store(tmp_path):
    path = str(tmp_path / "t.zarr")
    new_store(path, shards=(0,), finalize=False)
    kwargs = dict(rows=ROWS, views=VIEWS, topk=TOPK, num_classes=CLASSES, shard_rows=SHARD_ROWS)
    with pytest.raises(StoreMismatchError, match="different 'seed': it has 7, this dump asks"):
        create_store(path, **kwargs, attributes=store_attributes(seed=8))
    with pytest.raises(StoreMismatchError, match="different 'tail'"):
        create_store(path, **kwargs, tail="quantized", attributes=store_attributes())
    group = create_store(path, **kwargs, attributes=store_attributes(seed=8), overwrite=True)
    assert completed_shards(group) == set() and group.attrs["seed"] == 8
    write_shards(group, make_dump(), [0, 1, 2])
    finalize_store(group, priors())
    with pytest.raises(StoreMismatchError, match="already complete"):
        create_store(path, **kwargs, attributes=store_attributes(seed=8))
    with pytest.raises(ValueError, match="tail must be one of"):
        create_store(str(tmp_path / "u.zarr"), **kwargs, tail="int8",
                     attributes=store_attributes())


def test_create_store_holds_its_attributes_to_the_schema_every_open_checks(tmp_path):
    """topk <= num_classes, class_names of length C, ...: refused before anything is written,
    in the words a reader uses for a damaged store's attributes."""
    kwargs = dict(rows=ROWS, views=VIEWS, num_classes=CLASSES, shard_rows=SHARD_ROWS)
    with pytest.raises(ValueError, match=r"cannot create the logit store: attribute 'topk' "
                                         r"should be an integer in \[1, num_classes\], found 11"):
        create_store(str(tmp_path / "k.zarr"), **kwargs, topk=CLASSES + 1,
                     attributes=store_attributes())
    with pytest.raises(ValueError, match="attribute 'class_names' should be a list of "
                                         "num_classes names"):
        create_store(str(tmp_path / "c.zarr"), **kwargs, topk=TOPK,
                     attributes=store_attributes(class_names=["a", "b"]))
    assert not (tmp_path / "k.zarr").exists() and not (tmp_path / "c.zarr").exists()


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
    with pytest.raises(ClassPriorNotFoundError, match=r"temperature 2.0.*\[1.0, 4.0\]"):
        store.class_prior(2.0)


# ---------------------------------------------------------------------------------------------
# Integrity: nothing damaged reaches training without an error


def chunk_files(root, name):
    directory = root / name / "c"
    return sorted(os.path.join(path, file) for path, _, files in os.walk(directory)
                  for file in files)


@pytest.mark.parametrize("name", ["topk_codes", "topk_classes", "logsumexp", "tail_coefficients",
                                  "tail_residuals", "tail_mean", "tail_basis", "tail_scales",
                                  "boxes", "flips", "labels", "checksums", "label_checksums",
                                  "class_prior/T=1.0"])
@pytest.mark.parametrize("damage", ["delete", "flip_byte"])
def test_a_missing_or_damaged_chunk_of_any_array_is_an_error(tmp_path, name, damage):
    root = tmp_path / "t.zarr"
    new_store(root, tail="quantized")
    target = chunk_files(root, name)[-1]  # the short last shard (or the prior's one chunk)
    if damage == "delete":
        os.remove(target)
    else:
        data = bytearray(open(target, "rb").read())
        data[len(data) // 2] ^= 0x40
        open(target, "wb").write(bytes(data))
    problems = verify_store(str(root))
    named = {"checksums": "topk_codes", "label_checksums": "labels"}.get(name, name)
    joined = " ".join(problems)
    assert problems and (name in joined or named in joined), problems
    store = open_store(str(root))
    with pytest.raises(StoreCorruptError, match="rerun dump_logits"):
        if name.startswith("class_prior"):
            store.class_prior(1.0)
        elif name in ("tail_mean", "tail_basis", "tail_scales"):
            store.teacher_logits(0, 0, 10)
        elif name in ("labels", "label_checksums"):
            store.labels  # noqa: B018
        else:
            for view in range(VIEWS):
                store.read_rows(view, 20, 25)


@pytest.mark.parametrize("key, value, message", [
    ("num_classes", 1e9, "'num_classes' should be an integer"),
    ("rows", 1e15, "'rows' should be an integer"),
    ("topk", -5, "'topk' should be an integer in \\[1, num_classes\\]"),
    ("topk", "ten", "'topk' should be"),
    ("views", -1, "'views' should be"),
    ("views", "8", "'views' should be"),
    ("shard_rows", 0, "'shard_rows' should be"),
    ("rows", 31, "'num_shards' should be ceil"),
    ("rows", 26, "array 'topk_codes' has shape"),
    ("tail", "int4", "'tail' should be"),
    ("num_shards", 4, "'num_shards' should be"),
    ("views", 4, "array 'topk_codes' has shape"),
])
def test_attributes_are_validated_on_open(tmp_path, key, value, message):
    root = tmp_path / "t.zarr"
    new_store(root)
    zarr.open_group(str(root), mode="r+").update_attributes({key: value})
    with pytest.raises(StoreCorruptError, match=message):
        open_store(str(root))
    assert any("should be" in p or "has shape" in p for p in verify_store(str(root)))


# ---------------------------------------------------------------------------------------------
# Boxes


def test_boxes_replay_to_the_exact_pixel_box_on_every_side_a_scale_covers():
    """Every box value t / H (0 <= t <= H) through the fixed point, replayed as pixel_box does:
    for each power-of-two scale up to 4096 every side H up to it, and for the larger scales the
    40 largest sides they cover (the proof in box_scale's docstring covers the rest)."""
    cases = {2**j: range(1, 2**j + 1) for j in range(13)}
    cases.update({scale: range(exact_box_side(scale) - 40, exact_box_side(scale) + 1)
                  for scale in (2**13, 2**14, 2**15)})
    for scale, sides in cases.items():
        assert exact_box_side(scale) == sides[-1] and box_scale(sides[-1]) == scale
        heights = np.concatenate([np.full(side + 1, side) for side in sides])  # (M,)
        pixels = np.concatenate([np.arange(side + 1) for side in sides])  # (M,) 0..H per H
        boxes = (pixels / heights).astype(np.float32)  # as draw_views normalises
        read = decode_boxes(encode_boxes(boxes, scale), scale)
        assert np.array_equal(np.rint(read.astype(np.float64) * heights), pixels), scale
    coarse = 2048  # one power of two less is not enough: the bound is tight
    pixels = np.arange(4096)
    read = decode_boxes(encode_boxes((pixels / 4095).astype(np.float32), coarse), coarse)
    assert not np.array_equal(np.rint(read.astype(np.float64) * 4095), pixels)


def test_box_scale_is_the_smallest_exact_power_of_two():
    assert [box_scale(side) for side in (1, 32, 33, 500, 512, 4096, 4097, 16_000, 16_368)] == [
        1, 32, 64, 512, 512, 4096, 8192, 16384, 16384]
    assert box_scale(16_369) == 2**15 and exact_box_side(2**15) == MAX_SUPPORTED_IMAGE_SIDE
    for bad in (0, MAX_SUPPORTED_IMAGE_SIDE + 1, 2.5):
        with pytest.raises(ValueError, match="max_image_side"):
            box_scale(bad)


def test_images_above_the_stated_side_are_refused(tmp_path):
    rows = 40
    heights, widths = np.full(rows, 512), np.arange(473, 473 + rows)
    attributes = {"max_image_side": 512}
    check_image_sides(attributes, np.arange(rows), heights, widths)
    with pytest.raises(UserError, match=r"row 7 is 512x513 px, above .* max_image_side of 512"):
        check_image_sides(attributes, np.arange(rows), heights, widths + 33)
    with pytest.raises(ValueError, match="attribute 'max_image_side'"):
        create_store(str(tmp_path / "c.zarr"), rows=rows, views=2, topk=TOPK, num_classes=CLASSES,
                     shard_rows=rows, attributes=store_attributes(max_image_side=10**6))


# ---------------------------------------------------------------------------------------------
# Any Zarr v3 reader


def test_plain_zarr_opens_every_array_without_a_warning(tmp_path):
    root = tmp_path / "t.zarr"
    new_store(root, tail="quantized")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group = zarr.open_group(str(root), mode="r")
        for name in group.array_keys():
            group[name][...]
    codecs = {codec["name"] for name in group.array_keys()
              for codec in group[name].metadata.to_dict()["codecs"]}
    inner = {codec["name"] for name in group.array_keys()
             for outer in group[name].metadata.to_dict()["codecs"]
             for codec in outer.get("configuration", {}).get("codecs", [])}
    assert codecs | inner <= {"bytes", "blosc", "zstd", "crc32c", "sharding_indexed"}


def test_tensorstore_reads_the_same_values_as_zarr(tmp_path):
    tensorstore = pytest.importorskip("tensorstore")
    root = tmp_path / "t.zarr"
    new_store(root, tail="quantized")
    group = zarr.open_group(str(root), mode="r")
    for name in list(group.array_keys()) + ["class_prior/T=1.0"]:
        array = tensorstore.open({"driver": "zarr3", "kvstore": {
            "driver": "file", "path": str(root / name)}}).result()
        assert np.array_equal(array.read().result(), group[name][...]), name


# ---------------------------------------------------------------------------------------------
# Size (benchmarks/store_size.py measures more)


def test_bytes_per_view_of_a_top_k_only_store_at_k5_and_1000_classes(tmp_path):
    """<= 20 B per view at k = 5, C = 1000, box and flip included, for images up to 512 px."""
    rows = 2000
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 1000, rows)
    logits = rng.normal(0, 2, (1, rows, 1000)).astype(np.float32)
    logits[:, np.arange(rows), labels] += 6
    boxes, flips = draw_views(4, 1, np.arange(rows), rng.integers(200, 501, rows),
                              rng.integers(200, 501, rows))
    group = create_store(str(tmp_path / "s.zarr"), rows=rows, views=1, topk=5, num_classes=1000,
                         shard_rows=1000, attributes=store_attributes(1000, max_image_side=512))
    dump = dict(logits=logits, boxes=boxes, flips=flips, labels=labels)
    write_shards(group, dump, range(2), rows=rows, shard_rows=1000)
    finalize_store(group, {1.0: np.full((1000, 1000), 1e-3, np.float32)})
    summary = store_summary(open_store(str(tmp_path / "s.zarr")))
    assert summary["raw_bytes_per_view"] == 10 + 10 + 4 + 8 + 1
    assert summary["bytes_per_view"] <= 21.0, summary["bytes_per_view"]
