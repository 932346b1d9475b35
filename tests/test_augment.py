"""Seeded augmentation: purity, cross-process replay, torchvision's algorithm, exact box replay."""

import math
import multiprocessing

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from pipeline.stream.augment import (
    IMAGENET_MEAN, IMAGENET_STD, CropSpec, View, apply_view, draw_view, draw_views, eval_view,
    normalize, pixel_box)

SEED = 1234
SIZES = [(375, 500), (500, 375), (32, 32), (1, 1), (1, 1000), (1000, 1), (7, 3), (2048, 97)]


def _cases(count, seed=0):
    """(view, row, height, width) tuples covering odd sizes and large counters."""
    rng = np.random.default_rng(seed)
    cases = [(view, row, *size) for view, row in [(0, 0), (3, 17), (89, 115_845)]
             for size in SIZES]
    for _ in range(count - len(cases)):
        cases.append((int(rng.integers(0, 100)), int(rng.integers(0, 2**40)),
                      int(rng.integers(1, 3000)), int(rng.integers(1, 3000))))
    return cases


def _reference_view(seed, view, row, height, width, spec=CropSpec()):
    """torchvision's RandomResizedCrop.get_params line by line, in Python scalars, reading its
    randomness from the documented block: words 0-9 area, 10-19 log-ratio, 20 top, 21 left,
    22 flip, of Philox4x64 key (seed, view) from counter row * 6."""
    bit_generator = np.random.Philox(key=np.array([seed, view], np.uint64),
                                     counter=np.array([row * 6, 0, 0, 0], np.uint64))
    words = [int(word) for word in bit_generator.random_raw(24)]

    def uniform(low, high, word):
        return low + (high - low) * ((word >> 11) * 2.0**-53)

    def randint(bound, word):  # uniform integer in [0, bound)
        return (word >> 32) * bound >> 32

    area = height * width
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    for attempt in range(10):
        target_area = area * uniform(spec.scale[0], spec.scale[1], words[attempt])
        aspect_ratio = math.exp(uniform(log_ratio[0], log_ratio[1], words[10 + attempt]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = randint(height - h + 1, words[20])
            j = randint(width - w + 1, words[21])
            break
    else:
        in_ratio = float(width) / float(height)
        if in_ratio < min(spec.ratio):
            w = width
            h = int(round(w / min(spec.ratio)))
        elif in_ratio > max(spec.ratio):
            h = height
            w = int(round(h * max(spec.ratio)))
        else:
            w = width
            h = height
        i = (height - h) // 2
        j = (width - w) // 2
    flip = uniform(0, 1, words[22]) < spec.flip_probability
    return (i, j, h, w), flip


def _views_of(cases):
    """(len(cases), 5) float64: box and flip of draw_view for each case."""
    return np.array([[*draw_view(SEED, *case).box, draw_view(SEED, *case).flip]
                     for case in cases])


class _ViewDataset(Dataset):
    def __init__(self, cases):
        self.cases = cases

    def __len__(self):
        return len(self.cases)

    def __getitem__(self, index):
        view = draw_view(SEED, *self.cases[index])
        return torch.tensor([*view.box, view.flip], dtype=torch.float64)


def test_draw_view_is_pure_and_deterministic():
    numpy_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    first = draw_view(SEED, 2, 10, 375, 500)
    assert first == draw_view(SEED, 2, 10, 375, 500)
    assert isinstance(first, View) and isinstance(first.flip, bool)
    assert all(np.float32(value) == value for value in first.box)  # float32 values
    assert (np.random.get_state()[1] == numpy_state).all()  # no global RNG touched
    assert torch.equal(torch.get_rng_state(), torch_state)
    others = ([draw_view(SEED, view, 10, 375, 500) for view in range(3, 40)]
              + [draw_view(SEED, 2, row, 375, 500) for row in range(11, 48)]
              + [draw_view(SEED + 1, 2, 10, 375, 500)])
    assert len({view.box for view in others + [first]}) == len(others) + 1


def test_draw_view_pinned_values():
    # Guards the contract: stores dumped by an earlier run must replay with this code.
    assert draw_view(0, 0, 0, 375, 500) == View(
        box=(np.float32(0.10933334), np.float32(0.036), np.float32(0.328), np.float32(0.278)),
        flip=True)


def test_draw_view_follows_torchvision_algorithm():
    for case in _cases(400):
        view = draw_view(SEED, *case)
        box, flip = _reference_view(SEED, *case)
        assert pixel_box(view.box, case[2], case[3]) == box, case
        assert view.flip == flip, case


def test_same_views_in_spawned_process_and_dataloader_workers():
    cases = _cases(64)
    expected = _views_of(cases)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        spawned = pool.apply(_views_of, (cases,))
    assert np.array_equal(spawned, expected)
    loader = DataLoader(_ViewDataset(cases), batch_size=8, num_workers=2)
    assert np.array_equal(torch.cat(list(loader)).numpy(), expected)


def test_box_statistics_match_random_resized_crop():
    spec = CropSpec()
    height, width = 375, 500
    boxes, flips = draw_views(SEED, 4, np.arange(2000), height, width, spec=spec)
    pixels = np.array([pixel_box(box, height, width) for box in boxes.reshape(-1, 4)])
    top, left, crop_height, crop_width = pixels.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + crop_height <= height).all() and (left + crop_width <= width).all()
    # No fallback on a normal image: area fraction and aspect ratio stay in range, up to the
    # rounding of w and h to whole pixels (crops here are >= ~100 px a side).
    fraction = crop_height * crop_width / (height * width)
    aspect = crop_width / crop_height
    assert fraction.min() >= spec.scale[0] * 0.98 and fraction.max() <= spec.scale[1]
    assert aspect.min() >= spec.ratio[0] * 0.99 and aspect.max() <= spec.ratio[1] * 1.01
    assert fraction.min() < 0.1 and fraction.max() > 0.9  # spans the range
    assert abs(flips.mean() - 0.5) < 0.02
    # On a square image rejection is symmetric: log(aspect) ~ U(log 3/4, log 4/3), mean 0.
    boxes, _ = draw_views(SEED, 4, np.arange(2000), 512, 512, spec=spec)
    log_aspect = np.log(boxes[..., 3] / boxes[..., 2])
    assert abs(log_aspect.mean()) < 0.01


@pytest.mark.parametrize(("height", "width", "expected"),
                         [(1, 1000, (0, 499, 1, 1)), (1000, 1, (499, 0, 1, 1)),
                          (10, 1000, (0, 493, 10, 13))])
def test_fallback_on_extreme_shapes(height, width, expected):
    for row in range(20):  # no attempt can fit: always the clamped central crop
        assert pixel_box(draw_view(SEED, 0, row, height, width).box, height, width) == expected


def test_normalised_box_replays_exact_integer_box():
    for size in range(1, 2049):  # every offset of every side up to 2048
        offsets = np.arange(size + 1)
        stored = (offsets / size).astype(np.float32)
        assert np.array_equal(np.rint(stored.astype(np.float64) * size), offsets), size
    rng = np.random.default_rng(0)
    sizes = rng.integers(2049, 2**22, 2000)
    offsets = (rng.random(2000) * (sizes + 1)).astype(np.int64)
    stored = (offsets / sizes).astype(np.float32)
    assert np.array_equal(np.rint(stored.astype(np.float64) * sizes), offsets)
    # And through the public functions, for drawn boxes on many image sizes.
    for view, row, height, width in _cases(300, seed=1):
        boxes, _ = draw_views(SEED, [view], [row], height, width)
        assert pixel_box(boxes[0, 0], height, width) == _reference_view(
            SEED, view, row, height, width)[0]


def test_draw_views_matches_draw_view():
    rows = np.array([5, 6, 7, 100, 3, 4, 2**40, 0])  # runs and jumps
    heights = np.array([375, 32, 1, 1000, 7, 500, 64, 2])
    widths = np.array([500, 32, 1000, 1, 3, 375, 64, 2])
    spec = CropSpec(scale=(0.3, 0.9), ratio=(0.5, 2.0), flip_probability=0.3)
    boxes, flips = draw_views(SEED, [0, 3, 89], rows, heights, widths, spec=spec)
    assert boxes.shape == (3, 8, 4) and boxes.dtype == np.float32 and flips.dtype == bool
    for index, view in enumerate([0, 3, 89]):
        for column, row in enumerate(rows):
            single = draw_view(SEED, view, int(row), int(heights[column]), int(widths[column]),
                               spec=spec)
            assert tuple(boxes[index, column]) == single.box
            assert flips[index, column] == single.flip
    counted, _ = draw_views(SEED, 90, np.arange(50), 375, 500)  # views as a count
    assert np.array_equal(counted[89], draw_views(SEED, [89], np.arange(50), 375, 500)[0][0])


def test_apply_view_crops_resizes_and_flips():
    image = torch.arange(3 * 4 * 4, dtype=torch.uint8).reshape(3, 4, 4)
    full = (0.0, 0.0, 1.0, 1.0)
    assert torch.equal(apply_view(image, full, False, 4), image)
    assert torch.equal(apply_view(image, full, True, 4), image.flip(-1))
    quarter = np.array([0.25, 0.5, 0.5, 0.5], np.float32)  # rows 1:3, columns 2:4
    assert torch.equal(apply_view(image, quarter, False, 2), image[:, 1:3, 2:4])
    assert torch.equal(apply_view(image, quarter, True, 2), image[:, 1:3, 2:4].flip(-1))
    photo = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8)
    view = draw_view(SEED, 0, 0, 375, 500)
    for size in (32, 224):  # one box, any resolution
        out = apply_view(photo, view.box, view.flip, size)
        assert out.shape == (3, size, size) and out.dtype == torch.uint8
    with pytest.raises(ValueError, match="does not fit"):
        apply_view(image, (0.5, 0.0, 0.75, 1.0), False, 4)


def test_eval_view_resizes_shorter_side_then_center_crops():
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    assert eval_view(image, 32).shape == (3, 32, 32)
    assert eval_view(image, 224).shape == (3, 224, 224)
    # A 37-px image is already round(32 / 0.875) = 37: only the central crop remains.
    square = torch.randint(0, 256, (3, 37, 37), dtype=torch.uint8)
    assert torch.equal(eval_view(square, 32), square[:, 2:34, 2:34])


def test_normalize_known_values_device_dtype_and_memory_format():
    batch = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    out = normalize(batch.contiguous())
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0, :, 0, 0], -mean / std)
    torch.testing.assert_close(out[1, :, 0, 0], (1 - mean) / std)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    reference = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)(
        v2.functional.to_dtype(images, torch.float32, scale=True))
    assert torch.equal(normalize(images), reference)  # bitwise torchvision
    channels_last = normalize(images.to(memory_format=torch.channels_last), torch.bfloat16)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert channels_last.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="uint8"):
        normalize(images.float())


def test_crop_spec_round_trips_and_validates():
    spec = CropSpec(scale=[0.35, 1.0], ratio=(0.75, 4 / 3), flip_probability=0)
    assert spec.as_dict()["scale"] == [0.35, 1.0]
    assert CropSpec.from_dict(spec.as_dict()) == spec
    with pytest.raises(ValueError, match="generator"):
        CropSpec.from_dict({**spec.as_dict(), "generator": "other"})
    with pytest.raises(ValueError, match="scale"):
        CropSpec(scale=(0.9, 0.1))
    with pytest.raises(ValueError, match="flip_probability"):
        CropSpec(flip_probability=1.5)
    with pytest.raises(ValueError, match="row"):
        draw_view(SEED, 0, -1, 32, 32)
