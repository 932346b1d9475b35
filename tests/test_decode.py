"""The one decode path (pipeline.stream.decode.SourceImage, JPEG draft mode): the teacher's dump and
the student's replay see the same pixels for every view, bit for bit; a drafted view is the
same view (its box mapped exactly), only decoded at a DCT scale."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.jpeg import (SIZE, dump_and_replay, jpeg_layout, jpeg_sample, textured,
                          train_image_sizes)
from pipeline.stream.augment import (DECODE, apply_view, apply_view_drafted, draft_scale,
                              draw_views, pixel_box)
from pipeline.stream.device_decode import check_replay_decode
from pipeline.errors import UserError
from pipeline.store import open_store
from pipeline.stream.tars import CorruptShardError
from pipeline.stream.decode import SourceImage

VIEWS = 4


def test_draft_scale_keeps_at_least_the_output_size_on_both_sides():
    assert draft_scale((0, 0, 1, 1), 100, 200, 16) == 4  # 100 x 200 crop: 100 // 16 = 6
    assert draft_scale((0, 0, 1, 1), 255, 400, 32) == 4  # 255 / 8 < 32, 255 / 4 >= 32
    assert draft_scale((0, 0, 1, 1), 256, 400, 32) == 8
    assert draft_scale((0, 0, 0.5, 1), 100, 100, 32) == 1  # a 50 px side: 25 < 32
    assert draft_scale((0, 0, 1, 1), 400, 400, 224) == 1  # ImageNet sizes at 224 px


def test_a_drafted_view_is_the_same_view_decoded_at_a_dct_scale():
    """On smooth ramps (which DCT scaling keeps almost exactly) a drafted view matches the full
    decode's within 0.4 grey levels on average, with no drift; the same box moved by one
    drafted pixel (`scale` source pixels) is 0.7 to 3 levels off: the box maps exactly."""
    y, x = np.mgrid[:300, :410].astype(np.float32)
    ramps = np.stack([0.4 * x + 0.25 * y + 5, 250 - 0.4 * x - 0.2 * y, 0.3 * x + 0.3 * y + 30],
                     axis=-1).clip(0, 255).astype(np.uint8)
    image = SourceImage(jpeg_sample(ramps))
    boxes, flips = draw_views(5, 40, np.arange(1), 300, 410)  # (40, 1, 4)
    scales = []
    for box, flip in zip(boxes[:, 0], flips[:, 0]):
        scale = draft_scale(box, 300, 410, 32)
        scales.append(scale)
        if scale == 1:
            continue
        crop = image.crop(box, bool(flip), 32).float()
        full = apply_view(image.full(), box, bool(flip), 32).float()
        assert (crop - full).abs().mean() < 0.4 and abs((crop - full).mean()) < 0.15, scale
        top, left, height, width = pixel_box(box, 300, 410)
        moved = box.copy()
        moved[1] = (left + scale if left + scale + width <= 410 else left - scale) / 410
        off = apply_view(image.full(), moved, bool(flip), 32).float()
        assert (off - full).abs().mean() > 0.7
    assert {2, 4, 8} <= set(scales)


def test_drafted_views_decode_each_scale_once():
    image = SourceImage(jpeg_sample(textured(200, 200, seed=2)))
    first = image.crop((0, 0, 1, 1), False, 32)  # 200 px crop: 1/4 draft
    assert set(image._decoded) == {4} and image._decoded[4].size == (50, 50)
    assert torch.equal(image.crop((0, 0, 1, 1), False, 32), first)
    assert set(image._decoded) == {4}
    whole = apply_view_drafted(image._decoded[4], (0, 0, 1, 1), True, 32, 200, 200, 4)
    assert torch.equal(whole, first.flip(-1))


@pytest.fixture(scope="module")
def jpeg_data(tmp_path_factory):
    """The toy stage-one layout with textured JPEGs of 20..160 px: most views drafted at 1/2,
    1/4 or 1/8 for 16 px crops, some not."""
    root = tmp_path_factory.mktemp("jpegs")
    params, manifest, checkpoint, _ = jpeg_layout(root, seed=0, max_side=160, views=VIEWS)
    return root, params, manifest, checkpoint


def test_dump_and_replay_see_the_same_pixels_for_every_view(jpeg_data, monkeypatch):
    root, params, manifest, checkpoint = jpeg_data
    store, dumped, replayed = dump_and_replay(root, params, manifest, checkpoint, monkeypatch)
    assert store.attributes["decode"] == DECODE
    assert replayed.keys() == dumped.keys()
    for key, crop in dumped.items():
        assert torch.equal(replayed[key], crop), key
    scales = [draft_scale(store.read_rows(v, 0, store.rows)["boxes"][row], *sizes, SIZE)
              for v in range(VIEWS)
              for row, sizes in enumerate(train_image_sizes(root, manifest))]
    assert {1, 2, 4} <= set(scales)  # the test covers full and drafted decodes


def test_a_store_dumped_with_another_decode_is_refused(jpeg_data):
    """The student's check (pipeline.train.runs.train_student calls it; the device path's own
    refusal is in tests/test_device_decode.py)."""
    root, _, _, _ = jpeg_data
    store = open_store(str(root / "teacher.zarr"))
    check_replay_decode(store.path, store.attributes["decode"], DECODE)  # its own path: fine
    with pytest.raises(UserError, match="dumped with student.decode 'some-other-decoder'.*: "
                                        "rerun dump_logits"):
        check_replay_decode(store.path, "some-other-decoder", DECODE)


def _encoded(pixels: np.ndarray, **options) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", **options)
    return {"jpg": buffer.getvalue(), "__key__": "x", "__url__": "memory://x"}


def test_simplejpeg_gives_pillows_pixels_for_every_view_and_scale():
    """The decoder of the CPU path (simplejpeg) against the one it replaced (Pillow, the
    pixels of stores dumped before): every view of JPEGs of every chroma subsampling,
    progressive and grayscale ones, at crop sizes that take every draft scale, bit for bit."""
    rng = np.random.default_rng(3)
    cases = [dict(quality=90, subsampling=2), dict(quality=75, subsampling=1),
             dict(quality=95, subsampling=0), dict(quality=85, progressive=True),
             dict(quality=90, optimize=True)]
    scales = set()
    for index, options in enumerate(cases + [dict(quality=90)]):
        height, width = (int(v) for v in rng.integers(40, 420, 2))
        pixels = textured(height, width, seed=index)
        if index == len(cases):  # grayscale
            pixels = pixels[..., 0]
        sample = _encoded(pixels, **options)
        fast, slow = SourceImage(sample), SourceImage(sample, turbo=False)
        assert fast.turbo and not slow.turbo and (fast.height, fast.width) == (height, width)
        assert torch.equal(fast.full(), slow.full())
        boxes, flips = draw_views(index, 12, np.arange(1), height, width)
        for size in (8, 16, 32, 112):
            for box, flip in zip(boxes[:, 0], flips[:, 0]):
                scales.add(draft_scale(box, height, width, size))
                assert torch.equal(fast.crop(box, bool(flip), size),
                                   slow.crop(box, bool(flip), size)), (options, size, box)
        assert fast.turbo  # no fallback to Pillow happened
    assert scales == {1, 2, 4, 8}


def test_jpegs_simplejpeg_does_not_take_go_through_pillow_as_before():
    """CMYK JPEGs (Pillow's own CMYK -> RGB), PNGs, and damaged JPEGs (Pillow decides: here
    a corrupt-shard error naming the sample)."""
    cmyk = io.BytesIO()
    Image.fromarray(textured(64, 80, seed=1)).convert("CMYK").save(cmyk, format="JPEG")
    image = SourceImage({"jpg": cmyk.getvalue(), "__key__": "c", "__url__": "memory://c"})
    assert not image.turbo and image.jpeg
    reference = Image.open(io.BytesIO(cmyk.getvalue())).convert("RGB")
    assert torch.equal(image.full(), torch.from_numpy(np.array(reference)).permute(2, 0, 1))
    png = io.BytesIO()
    Image.fromarray(textured(30, 20, seed=2)).save(png, format="PNG")
    image = SourceImage({"png": png.getvalue(), "__key__": "p", "__url__": "memory://p"})
    assert not image.turbo and not image.jpeg and image.full().shape == (3, 30, 20)
    damaged = _encoded(textured(64, 64, seed=3), quality=90)
    damaged["jpg"] = damaged["jpg"][:len(damaged["jpg"]) // 2]
    image = SourceImage(damaged)
    with pytest.raises(CorruptShardError, match="sample x cannot be decoded"):
        image.full()
    assert not image.turbo  # simplejpeg refused it; Pillow named it
