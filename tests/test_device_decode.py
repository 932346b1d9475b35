"""The device decode path (student.decode: gpu; pipeline/stream/device_decode.py), run on the CPU: the
same tensor code a GPU runs, with libjpeg-turbo where a GPU has nvJPEG. It cuts the same boxes
and flips as the CPU path (bit for bit wherever the CPU path decodes at full size), the dump
and the replay see the same pixels, and a store is replayed only through its own path."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.jpeg import (SIZE, dump_and_replay, jpeg_layout, jpeg_sample, textured,
                          train_image_sizes)
from helpers import params_from, with_changes
from pipeline.stream.augment import DECODE, apply_view, draft_scale, draw_views
from pipeline.stream.device_decode import (DEVICE_DECODE, batch_pixels, decode_on_device,
                                    decode_path, decode_summary, device_views, warn_if_decoded_elsewhere,
                                    worker_payload)
from pipeline.train.runs import train_student
from pipeline.store.dump import dump_logits
from pipeline.errors import UserError
from pipeline.stream.decode import SourceImage

VIEWS = 3
CPU = torch.device("cpu")


def png_sample(pixels: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return {"png": buffer.getvalue(), "__key__": "x", "__url__": "memory://x"}


def test_auto_follows_the_store_else_takes_the_measured_cpu_path_on_cuda_too():
    cuda = torch.device("cuda", 0)
    assert decode_path("auto", CPU) == DECODE
    assert decode_path("auto", cuda) == DECODE  # the gpu path has not been measured on a GPU
    assert decode_path("auto", cuda, recorded=DECODE) == DECODE
    assert decode_path("auto", CPU, recorded=DEVICE_DECODE) == DEVICE_DECODE
    assert decode_path("cpu", cuda) == DECODE and decode_path("gpu", CPU) == DEVICE_DECODE
    with pytest.raises(ValueError, match="'nvjpeg'"):
        decode_path("nvjpeg", CPU)


@pytest.mark.parametrize("make_sample", [jpeg_sample, png_sample])
def test_the_device_path_cuts_the_cpu_paths_boxes_and_flips(make_sample):
    """Same boxes, same flips, same resize: every view the CPU path decodes at full size is
    bitwise the device path's (a PNG's always; a JPEG's when its crop is too small to draft).
    Drafted views differ only by the DCT scaling (a few grey levels on average), which is why
    a store records its path."""
    height, width, CUT = 150, 210, 64  # crops under 128 px decode at full size, others at 1/2
    sample = make_sample(textured(height, width, seed=4))
    boxes, flips = draw_views(11, 48, np.arange(1), height, width)  # (48, 1, 4), (48, 1)
    boxes, flips = boxes[:, 0], flips[:, 0]
    cpu = SourceImage(sample)
    payload = worker_payload(SourceImage(sample))
    assert isinstance(payload, bytes) == ("jpg" in sample)
    device = device_views([payload] * len(boxes), torch.from_numpy(boxes),
                          torch.from_numpy(flips), CUT, CPU)  # (48, 3, 64, 64)
    assert device.shape == (48, 3, CUT, CUT) and device.dtype == torch.uint8
    full, drafted = 0, 0
    for index, (box, flip) in enumerate(zip(boxes, flips)):
        expected = cpu.crop(box, bool(flip), CUT)
        if "png" in sample or draft_scale(box, height, width, CUT) == 1:
            assert torch.equal(device[index], expected), index
            full += 1
        else:
            assert (device[index].float() - expected.float()).abs().mean() < 12, index
            drafted += 1
    assert flips.any() and not flips.all()
    assert full >= 5 and (drafted >= 5 or "png" in sample)


def test_a_batch_is_decoded_where_it_trains():
    jpeg = jpeg_sample(textured(40, 60, seed=1))
    png = png_sample(textured(50, 30, seed=2))
    payloads = [worker_payload(SourceImage(s)) for s in (jpeg, png, jpeg)]
    boxes = torch.tensor([[0, 0, 1, 1], [0.1, 0.2, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]],
                         dtype=torch.float32)
    flips = torch.tensor([False, True, False])
    batch = {"payloads": payloads, "boxes": boxes, "flips": flips,
             "rows": torch.tensor([4, 5, 6])}
    pixels = batch_pixels(batch, CPU, SIZE)
    for index, sample in enumerate((jpeg, png, jpeg)):
        expected = apply_view(SourceImage(sample).full(), boxes[index], bool(flips[index]), SIZE)
        assert torch.equal(pixels[index], expected)  # the full-size decode, cut
    cut = {"images": pixels}  # the CPU path's batch is only moved
    assert batch_pixels(cut, CPU, SIZE) is pixels


def test_the_log_line_says_which_path_runs_where_and_why():
    cuda = torch.device("cuda", 0)
    assert (decode_summary(DECODE, "auto", cuda)
            == "decode cpu (pil-draft-v1) on cuda (student.decode: auto, the measured path; gpu "
               "(nvJPEG) is not measured on a GPU yet: BENCHMARKS.md section 7)")
    assert (decode_summary(DECODE, "auto", CPU)
            == "decode cpu (pil-draft-v1) on cpu (student.decode: auto, no CUDA here)")
    following = decode_summary(DEVICE_DECODE, "auto", CPU, follows_store=True)
    assert following.startswith("decode gpu (torchvision-full-v1) on the CPU, in the training "
                                "process (no CUDA")
    assert following.endswith("(student.decode: auto, following the store)")
    assert decode_summary(DECODE, "cpu", cuda).endswith("on cuda (student.decode: cpu)")


def test_the_views_of_one_image_share_one_decode(monkeypatch):
    """m views of a row (student.views_per_decode) carry one payload object: one decode."""
    import pipeline.stream.device_decode as device_decode

    calls = []
    real = device_decode._decode_jpegs
    monkeypatch.setattr(device_decode, "_decode_jpegs",
                        lambda encoded, device: calls.append(len(encoded)) or real(encoded, device))
    first = jpeg_sample(textured(40, 60, seed=1))["jpg"]
    second = jpeg_sample(textured(40, 60, seed=2))["jpg"]
    images = decode_on_device([first, first, second, first], CPU)
    assert calls == [2]
    assert images[0] is images[1] is images[3] and not torch.equal(images[0], images[2])


def test_a_store_decoded_on_another_kind_of_device_is_named(capsys):
    warn_if_decoded_elsewhere("s.zarr", "cuda", DEVICE_DECODE, CPU)
    assert "s.zarr was decoded on cuda and this student decodes on cpu" in capsys.readouterr().out
    warn_if_decoded_elsewhere("s.zarr", "cpu", DEVICE_DECODE, CPU)
    warn_if_decoded_elsewhere("s.zarr", None, DECODE, CPU)  # the CPU path: no device recorded
    assert capsys.readouterr().out == ""


def test_a_jpeg_that_does_not_decode_names_the_rows():
    data = jpeg_sample(textured(40, 60, seed=1))["jpg"]
    with pytest.raises(UserError, match=r"rows \[7\].*student.decode: cpu"):
        device_views([data[:300]], torch.tensor([[0, 0, 1, 1.0]]), torch.tensor([False]),
                     SIZE, CPU, rows=[7])


@pytest.fixture(scope="module")
def device_store(tmp_path_factory):
    """The toy layout with textured JPEGs of 20..120 px, for a KL student decoding on the
    device (`student.decode: gpu`, here on the CPU)."""
    root = tmp_path_factory.mktemp("device")
    params, manifest, checkpoint, raw = jpeg_layout(root, seed=1, max_side=120, views=VIEWS,
                                                    decode="gpu", loss="kl", epochs=1)
    return root, params, manifest, checkpoint, raw


def test_dump_and_replay_on_the_device_path_see_the_same_pixels(device_store, monkeypatch):
    root, params, manifest, checkpoint, _ = device_store

    def ships_encoded_images(batch):
        assert "images" not in batch and len(batch["payloads"]) == len(batch["rows"])

    store, dumped, replayed = dump_and_replay(root, params, manifest, checkpoint, monkeypatch,
                                              decode=DEVICE_DECODE,
                                              check_batch=ships_encoded_images)
    assert store.attributes["decode"] == DEVICE_DECODE
    assert store.attributes["decode_device"] == "cpu"
    assert replayed.keys() == dumped.keys()
    for key, crop in dumped.items():
        assert torch.equal(replayed[key], crop), key
    # the draft scales the CPU path would use: the test covers views of both kinds
    sizes = train_image_sizes(root, manifest)
    scales = {draft_scale(store.read_rows(v, 0, store.rows)["boxes"][row], *sizes[row], SIZE)
              for v in range(VIEWS) for row in range(store.rows)}
    assert {1, 2} <= scales


def test_a_student_replays_a_store_only_through_its_decode_path(device_store, tmp_path):
    root, params, _, checkpoint, raw = device_store
    store_path = root / "teacher.zarr"
    if not store_path.exists():
        dump_logits(params, "teacher", str(root / "shards"), str(checkpoint), str(store_path))
    cpu_params = params_from(with_changes(raw, "student", decode="cpu"))
    with pytest.raises(UserError, match=r"dumped with student.decode gpu \(torchvision-full-v1\) "
                                        r"but this student decodes with cpu \(pil-draft-v1\).*"
                                        r"set student.decode: gpu \(or auto"):
        train_student(cpu_params, str(root / "shards"), str(store_path), str(checkpoint),
                      str(tmp_path / "student"), str(tmp_path / "live"))
    auto = params_from(with_changes(raw, "student", decode="auto"))
    metrics = train_student(auto, str(root / "shards"), str(store_path), str(checkpoint),
                            str(tmp_path / "auto"), str(tmp_path / "auto-live"))
    assert np.isfinite(metrics["train/loss"])
