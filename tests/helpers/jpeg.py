"""JPEG helpers of the decode tests (test_decode.py: the CPU path; test_device_decode.py:
the device path): textured pictures, a toy stage-one layout of them with an untrained teacher,
and a dump spied on and replayed view by view."""

import io

import numpy as np
import torch
from PIL import Image

import pipeline.store.dump
from helpers import CLASS_IMAGES, image_folder_raw_params, params_from, with_changes
from pipeline.stream.augment import DECODE
from pipeline.stream.device_decode import batch_pixels
from pipeline.train.runs import crop_spec
from pipeline.store.dump import dump_logits
from pipeline.train.models import build_model
from pipeline.data.shards import prepare_shards
from pipeline.store import open_store
from pipeline.stream.decode import SourceImage
from pipeline.stream.views import ViewSource
from pipeline.stream.loader import read_shard, split_shards, train_loader

SIZE = 16  # the teacher's and the student's crop side


def textured(height: int, width: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8: ramps and waves of a few px period, so a misplaced box shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width].astype(np.float32)
    waves = [96 + 60 * np.sin(x / rng.uniform(3, 9) + y / rng.uniform(4, 12) + c)
             + 0.3 * (x + y) % 64 for c in range(3)]
    return np.clip(np.stack(waves, axis=-1), 0, 255).astype(np.uint8)


def jpeg_sample(pixels: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return {"jpg": buffer.getvalue(), "__key__": "x", "__url__": "memory://x"}


def jpeg_layout(root, *, seed: int, max_side: int, views: int, **student):
    """The image-folder toy layout under `root` with textured JPEGs of 20..max_side px (sides
    drawn from `seed`), prepared into shards, with an untrained resnet8 teacher checkpoint at
    SIZE px; `student`: changes to the student section. Returns (params, manifest, checkpoint, raw)."""
    rng = np.random.default_rng(seed)
    for name, count in CLASS_IMAGES.items():
        (root / "images" / name).mkdir(parents=True)
        for index in range(count):
            height, width = (int(v) for v in rng.integers(20, max_side + 1, 2))
            Image.fromarray(textured(height, width, seed=index)).save(
                root / "images" / name / f"{index:02d}.jpg", quality=90)
    raw = with_changes(image_folder_raw_params(root / "images"), "logits", views=views,
                       tail="none", batch_size=64)
    if student:
        raw = with_changes(raw, "student", **student)
    params = params_from(raw)
    manifest = prepare_shards(params.data, params.seed, root / "shards")
    torch.manual_seed(0)
    model = build_model("resnet8", manifest["num_classes"])
    checkpoint = root / "teacher.pt"
    torch.save({"model": model.state_dict(), "arch": "resnet8", "small_input": False,
                "num_classes": manifest["num_classes"], "epoch": 0,
                "params": {"train": {"image_size": SIZE}}}, checkpoint)
    return params, manifest, checkpoint, raw


def dump_and_replay(root, params, manifest, checkpoint, monkeypatch, *, decode: str = DECODE,
                    check_batch=lambda batch: None):
    """Dump the teacher's store to root/teacher.zarr, spying on the uint8 crops it feeds the
    teacher, then replay view e as student epoch e through `decode`'s loader (each batch
    passed to `check_batch`, its pixels from batch_pixels). Returns the store and the dumped
    and replayed crops, each {(view, row): (3, SIZE, SIZE) uint8}."""
    seen = []  # the dump's uint8 crops, one (n, 3, SIZE, SIZE) batch per shard and view
    real_normalize = pipeline.store.dump.normalize
    monkeypatch.setattr(pipeline.store.dump, "normalize",
                        lambda crops: seen.append(crops.clone()) or real_normalize(crops))
    store_path = root / "teacher.zarr"
    dump_logits(params, "teacher", str(root / "shards"), str(checkpoint), str(store_path))
    views = params.logits.views
    shards = split_shards(str(root / "shards"), manifest, "train")
    assert len(seen) == len(shards) * views
    dumped = {(view, row): crop for index, shard in enumerate(shards) for view in range(views)
              for row, crop in zip(range(shard.start, shard.stop), seen[index * views + view])}
    store = open_store(str(store_path))
    replayed = {}
    for epoch in range(views):  # epoch e replays view e
        source = ViewSource(params.seed, epoch, 1, crop_spec(params.augment), store)
        for batch in train_loader(shards, source, batch_size=8, image_size=SIZE, workers=0,
                                  decode=decode):
            check_batch(batch)
            for row, crop in zip(batch["rows"].tolist(), batch_pixels(batch, torch.device("cpu"),
                                                                      SIZE)):
                replayed[epoch, row] = crop
    return store, dumped, replayed


def train_image_sizes(root, manifest) -> list[tuple[int, int]]:
    """(height, width) of every train row's image, in row order."""
    shards = split_shards(str(root / "shards"), manifest, "train")
    return [(image.height, image.width) for shard in shards
            for image in map(SourceImage, read_shard(shard))]
