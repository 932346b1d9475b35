"""Inputs from the wild (issue 13, items 1-4, 6-7): hidden files and OS litter, every Pillow
mode as the 8-bit RGB picture a viewer shows, split lists saved by other tools, CIFAR
archives re-saved by Python 3 or damaged, damaged shards and hostile manifests.

Every image here is generated with pixels whose viewer rendering is known exactly."""

import io
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from helpers import save_image
from pipeline.errors import UserError
from pipeline.data.images import viewer_rgb
from pipeline.params import DataParams
from pipeline.data.shards import prepare_shards
from pipeline.data.manifest import load_manifest, verify_shards
from pipeline.data.sources import Item, SourceError, _read_list, encode_item
from pipeline.stream.tars import CorruptShardError
from pipeline.stream.decode import decode
from pipeline.stream.loader import eval_loader, read_shard, split_shards


def prepare(tmp_path, name="shards", **options):
    options = {"workers": 0, "shard_size": 4, **options}
    out = tmp_path / name
    return prepare_shards(DataParams(**options), 0, out), out


def one_line_error(error) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------------------------------------
# 1. Hidden entries and OS litter in ImageFolder trees

def image_folder(root, rng, classes=("a", "b", "c"), count=6):
    for name in classes:
        for i in range(count):
            save_image(root / name / f"img{i}.png", rng, size=(8, 8), fmt="PNG")
    return root


def test_image_folder_skips_hidden_entries_and_os_litter_and_records_them(tmp_path):
    clean = image_folder(tmp_path / "clean", np.random.default_rng(0))
    root = tmp_path / "litter"
    shutil.copytree(clean, root)
    (root / ".ipynb_checkpoints").mkdir()  # empty: was taken as a class with 0 images
    (root / "a/.ipynb_checkpoints").mkdir()  # a copy of a train image: leaked into class a
    shutil.copy(root / "a/img0.png", root / "a/.ipynb_checkpoints/img0-checkpoint.png")
    (root / "a/._img0.png").write_bytes(b"\x00\x05\x16\x07" + bytes(4092))  # AppleDouble
    (root / "__MACOSX/b").mkdir(parents=True)
    (root / "__MACOSX/b/._img1.png").write_bytes(bytes(4096))
    (root / ".DS_Store").write_bytes(bytes(64))
    (root / "b/Thumbs.db").write_bytes(bytes(64))
    (root / "c/desktop.ini").write_text("[.ShellClassInfo]\n")
    shutil.copy(root / "c/img0.png", root / "c/.hidden.png")  # a readable image, but hidden
    options = dict(source="image_folder", val_per_class=1, test_per_class=1,
                   imbalance_ratio=1)
    expected, _ = prepare(tmp_path, "expected", root=str(clean), **options)
    manifest, out = prepare(tmp_path, root=str(root), **options)
    assert manifest["class_names"] == ["a", "b", "c"]
    assert manifest["train_counts"] == expected["train_counts"] == [4, 4, 4]
    assert sorted(manifest["ignored"]["paths"]) == sorted([
        ".DS_Store", ".ipynb_checkpoints/", "__MACOSX/", "a/.ipynb_checkpoints/",
        "a/._img0.png", "b/Thumbs.db", "c/.hidden.png", "c/desktop.ini"])
    assert manifest["ignored"]["count"] == 8 and expected["ignored"]["count"] == 0
    assert manifest["skipped"]["count"] == 0
    # The same data: the fingerprint (and every shard) is that of the clean tree.
    assert manifest["fingerprint"] == expected["fingerprint"]
    paths = [json.loads(s["json"])["path"] for split in manifest["splits"]
             for s in wds.WebDataset([x.url for x in split_shards(str(out), manifest, split)],
                                     shardshuffle=False)]
    assert len(paths) == 18 and not any("/." in p or p.startswith(".") for p in paths)


# ---------------------------------------------------------------------------------------------
# 2. Every Pillow mode as the 8-bit RGB picture a viewer shows

def gray(values):  # (H, W) uint8 -> (H, W, 3)
    return np.repeat(np.asarray(values, np.uint8)[:, :, None], 3, axis=2)


def ramp16():
    """I;16 PNG: 0, 257, ..., 65535 (256 values) -> 0, 1, ..., 255 (the high byte)."""
    values = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    return Image.fromarray(values), gray(np.arange(256).reshape(16, 16)), "PNG"


def int16_big_endian():
    values = (np.arange(64, dtype=np.uint16) * 1024).reshape(8, 8)
    image = Image.frombytes("I;16B", (8, 8), values.astype(">u2").tobytes())
    return image, gray((values >> 8).astype(np.uint8)), "TIFF"


def int32_in_16_bit_range():
    values = (np.arange(64, dtype=np.int32) * 1000).reshape(8, 8)  # 0..63000
    return Image.fromarray(values), gray(values >> 8), "TIFF"


def int32_other_range():
    values = np.linspace(-1000, 1000, 64).round().astype(np.int32).reshape(8, 8)
    expected = np.round((values + 1000) * 255 / 2000)
    return Image.fromarray(values), gray(expected), "TIFF"


def float_unit_range():
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    return Image.fromarray(values), gray(np.round(values.astype(np.float64) * 255)), "TIFF"


def float_other_range():
    values = np.linspace(-2, 6, 64, dtype=np.float32).reshape(8, 8)
    expected = np.round((values.astype(np.float64) + 2) * 255 / 8)
    return Image.fromarray(values), gray(expected), "TIFF"


def gray_alpha():
    """LA: black with alpha 0..252 over white -> 255 - alpha."""
    alpha = (np.arange(64) * 4).astype(np.uint8).reshape(8, 8)
    image = Image.merge("LA", [Image.new("L", (8, 8), 0), Image.fromarray(alpha)])
    return image, gray(255 - alpha), "PNG"


def rgba():
    """Red with alpha a over white -> (255, 255 - a, 255 - a)."""
    alpha = (np.arange(64) * 4).astype(np.uint8).reshape(8, 8)
    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[..., 0], pixels[..., 3] = 255, alpha
    expected = np.stack([np.full((8, 8), 255), 255 - alpha, 255 - alpha], axis=2)
    return Image.fromarray(pixels, "RGBA"), expected, "PNG"


def palette_with_transparency():
    """P: index 0 (red) transparent -> white; index 1 -> green."""
    indices = np.tile([0, 1], 32).reshape(8, 8).astype(np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette([255, 0, 0, 0, 255, 0])
    image.info["transparency"] = 0
    expected = np.where(indices[..., None] == 0, [255, 255, 255], [0, 255, 0])
    return image, expected, "PNG"


def palette_opaque():
    indices = np.tile([0, 1], 32).reshape(8, 8).astype(np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette([255, 0, 0, 0, 0, 255])
    return image, np.where(indices[..., None] == 0, [255, 0, 0], [0, 0, 255]), "PNG"


def rgb_with_transparent_colour():
    """RGB PNG with a tRNS colour (0, 0, 0): black pixels are transparent -> white."""
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[::2] = (10, 20, 30)
    image = Image.fromarray(pixels)
    image.info["transparency"] = (0, 0, 0)
    expected = np.where(pixels.sum(axis=2, keepdims=True) == 0, 255, pixels)
    return image, expected, "PNG"


def cmyk():
    """CMYK (Pillow's conversion): no ink -> white, magenta ink -> (255, 0, 255), K -> black,
    cyan 128 + yellow 64 -> (127, 255, 191)."""
    inks = [(0, 0, 0, 0), (0, 255, 0, 0), (0, 0, 0, 255), (128, 0, 64, 0)]
    rgbs = [(255, 255, 255), (255, 0, 255), (0, 0, 0), (127, 255, 191)]
    image = Image.new("CMYK", (4, 1))
    for x, ink in enumerate(inks):
        image.putpixel((x, 0), ink)
    return image, np.array([rgbs]), "TIFF"


def ycbcr():
    """YCbCr (full range, as JPEG): neutral chroma -> grey Y; Y 255 -> white."""
    image = Image.new("YCbCr", (3, 1))
    for x, y in enumerate((0, 128, 255)):
        image.putpixel((x, 0), (y, 128, 128))
    return image, np.array([[(0, 0, 0), (128, 128, 128), (255, 255, 255)]]), "TIFF"


def lab():
    """LAB: L 0 -> black, L 100 % -> white (a = b = 0, stored as 128), within 2."""
    image = Image.new("LAB", (2, 1))
    image.putpixel((0, 0), (0, 128, 128))
    image.putpixel((1, 0), (255, 128, 128))
    return image, np.array([[(0, 0, 0), (255, 255, 255)]]), "TIFF"


def one_bit():
    bits = (np.indices((8, 8)).sum(axis=0) % 2).astype(bool)
    return Image.fromarray(bits), gray(np.where(bits, 255, 0)), "PNG"


MODES = {"I;16 ramp": ramp16, "I;16B": int16_big_endian, "I 16-bit range": int32_in_16_bit_range,
         "I other range": int32_other_range, "F [0, 1]": float_unit_range,
         "F other range": float_other_range, "LA": gray_alpha, "RGBA": rgba,
         "P transparent": palette_with_transparency, "P opaque": palette_opaque,
         "RGB tRNS": rgb_with_transparent_colour, "CMYK": cmyk, "YCbCr": ycbcr, "LAB": lab,
         "1-bit": one_bit}
TOLERANCE = {"LAB": 2}  # Pillow's LAB -> sRGB conversion rounds through its own white point


def encode_file(path):
    encoded = encode_item(Item(path=path.name, label=0, file=str(path)), 0, 90)
    assert not isinstance(encoded, str), encoded
    return encoded


@pytest.mark.parametrize("name", MODES)
def test_every_mode_is_stored_as_what_a_viewer_shows(tmp_path, name):
    image, expected, fmt = MODES[name]()
    path = tmp_path / f"image.{fmt.lower()}"
    image.save(path, format=fmt, **({"transparency": image.info["transparency"]}
                                    if "transparency" in image.info else {}))
    with Image.open(path) as reopened:
        # The file really has the mode under test (else the test would test nothing).
        assert reopened.mode.split(";")[0] == image.mode.split(";")[0]
    encoded = encode_file(path)
    with Image.open(io.BytesIO(encoded.data)) as stored:
        assert (stored.format, stored.mode) == ("PNG", "RGB")  # plain 8-bit RGB in the shard
    pixels = decode({"png": encoded.data, "__key__": "0", "__url__": "x"})  # (3, H, W)
    pixels = pixels.permute(1, 2, 0).numpy().astype(int)
    assert (encoded.width, encoded.height) == image.size
    assert np.abs(pixels - np.asarray(expected)).max() <= TOLERANCE.get(name, 0)


def test_sixteen_bit_ramp_through_prepare(tmp_path):
    """The issue's case end to end: a 16-bit greyscale PNG ramp came out almost white (mean
    254.3, 4 distinct values); through prepare and the stream it is the ramp."""
    root = tmp_path / "root"
    (root / "x").mkdir(parents=True)
    image, expected, _ = ramp16()
    image.save(root / "x/ramp.png")
    save_image(root / "y/plain.png", np.random.default_rng(0), size=(16, 16), fmt="PNG")
    for split in ("train", "test"):
        (tmp_path / f"{split}.txt").write_text("x/ramp.png 0\ny/plain.png 1\n")
    manifest, out = prepare(tmp_path, source="split_lists", root=str(root),
                            train_list=str(tmp_path / "train.txt"),
                            test_list=str(tmp_path / "test.txt"))
    samples = [s for shard in split_shards(str(out), manifest, "train")
               for s in read_shard(shard)]
    ramp = next(s for s in samples if s["meta"]["path"] == "x/ramp.png")
    pixels = decode(ramp).permute(1, 2, 0).numpy()
    assert np.array_equal(pixels, expected)
    assert len(np.unique(pixels)) == 256 and pixels.mean() == 127.5
    plain = next(s for s in samples if s["meta"]["path"] == "y/plain.png")
    assert plain["png"] == (root / "y/plain.png").read_bytes()  # plain RGB: original bytes


def exif_rotated(tmp_path, orientation):
    """A 16 x 8 (W x H) PNG, left half red, right half blue, with an EXIF orientation."""
    pixels = np.zeros((8, 16, 3), np.uint8)
    pixels[:, :8] = (255, 0, 0)
    pixels[:, 8:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rotated{orientation}.png"
    image.save(path, exif=exif)
    return path


def test_exif_orientation_is_applied_as_viewers_do(tmp_path):
    # Orientation 6: the viewer turns the stored picture 90 degrees clockwise, so the stored
    # left (red) half is on top and the picture is 8 wide, 16 high.
    encoded = encode_file(exif_rotated(tmp_path, 6))
    pixels = decode({"png": encoded.data, "__key__": "0"}).permute(1, 2, 0).numpy()
    assert (encoded.width, encoded.height) == (8, 16) and pixels.shape == (16, 8, 3)
    assert (pixels[:8] == (255, 0, 0)).all() and (pixels[8:] == (0, 0, 255)).all()
    # Orientation 1 (upright) keeps the file's own bytes.
    upright = exif_rotated(tmp_path, 1)
    assert encode_file(upright).data == upright.read_bytes()


@pytest.mark.parametrize("mode, fmt", [("RGB", "PNG"), ("L", "PNG"), ("RGB", "JPEG"),
                                       ("L", "JPEG")])
def test_plain_8_bit_files_keep_their_bytes(tmp_path, mode, fmt):
    path = tmp_path / f"plain.{fmt.lower()}"
    pixels = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt)
    assert encode_file(path).data == path.read_bytes()


def test_viewer_rgb_of_in_memory_modes():
    """Modes no file format here writes, through the same rules."""
    image, expected, _ = ramp16()
    assert np.array_equal(np.asarray(viewer_rgb(image)), expected)
    palette_alpha = Image.new("PA", (2, 1))
    palette_alpha.putpalette([255, 0, 0])
    palette_alpha.putpixel((1, 0), (0, 255))  # pixel 0: index 0, alpha 0 -> white
    assert np.asarray(viewer_rgb(palette_alpha)).tolist() == [[[255, 255, 255], [255, 0, 0]]]
    assert np.asarray(viewer_rgb(Image.new("HSV", (1, 1), (0, 255, 255)))).tolist() == [
        [[255, 0, 0]]]
    # Premultiplied (100, 0, 0) at alpha 128 is (199, 0, 0) at half opacity over white.
    premultiplied = Image.new("RGBa", (1, 1), (100, 0, 0, 128))
    assert np.asarray(viewer_rgb(premultiplied)).tolist() == [[[227, 127, 127]]]


# ---------------------------------------------------------------------------------------------
# 3. Split lists saved by other tools

LIST_LINES = [("n01 cat photos/my image 0.jpg", 0), ("n02/b.jpg", 1)]


@pytest.mark.parametrize("variant", ["bom", "crlf", "cr", "trailing", "blank", "tabs",
                                     "utf16"])
def test_split_lists_read_robustly(tmp_path, variant):
    lines = [f"{path} {label}" for path, label in LIST_LINES]
    text = "\n".join(lines) + "\n"
    data = {
        "bom": b"\xef\xbb\xbf" + text.encode(),
        "crlf": text.replace("\n", "\r\n").encode(),
        "cr": text.replace("\n", "\r").encode(),
        "trailing": "\n".join(f"{line}  \t " for line in lines).encode(),
        "blank": ("\n\n" + "\n  \n".join(lines) + "\n\n\n").encode(),
        "tabs": "\n".join(f"{p}\t{label}" for p, label in LIST_LINES).encode(),
        "utf16": text.encode("utf-16"),
    }[variant]
    file = tmp_path / "list.txt"
    file.write_bytes(data)
    assert [(path, label) for path, label, _ in _read_list(file)] == LIST_LINES


def test_split_list_with_bom_and_crlf_through_prepare(tmp_path):
    """The issue's case: the BOM went into the first path ('\\ufeffn01 cat photos/...')."""
    rng = np.random.default_rng(2)
    root = tmp_path / "root"
    for path, _ in LIST_LINES:
        save_image(root / path, rng)
    text = "".join(f"{path} {label}\r\n" for path, label in LIST_LINES)
    for split in ("train", "test"):
        (tmp_path / f"{split}.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    manifest, _ = prepare(tmp_path, source="split_lists", root=str(root),
                          train_list=str(tmp_path / "train.txt"),
                          test_list=str(tmp_path / "test.txt"))
    assert manifest["splits"]["train"]["rows"] == 2 and manifest["skipped"]["count"] == 0
    assert manifest["class_names"] == ["n01 cat photos", "n02"]


def test_split_list_that_is_not_text(tmp_path):
    file = tmp_path / "list.txt"
    file.write_bytes(b"a.jpg 0\n\xff\xfe\xfa.jpg 1\n")
    with pytest.raises(SourceError) as error:
        _read_list(file)
    assert one_line_error(error).startswith(f"{file}: not UTF-8 text")


# ---------------------------------------------------------------------------------------------
# 4. CIFAR archives: str keys, malformed archives

def cifar10(folder, rng, key=lambda k: k.encode(), **changes):
    """A CIFAR-10 folder (5 x 20 train, 20 test) with keys made by `key`; `changes` replace a
    file's whole content (name -> bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in [(f"data_batch_{i}", 20) for i in range(1, 6)] + [("test_batch", 20)]:
        (folder / name).write_bytes(pickle.dumps({
            key("data"): rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            key("labels"): [i % 10 for i in range(count)]}))
    (folder / "batches.meta").write_bytes(pickle.dumps(
        {key("label_names"): [f"class{c}" if key("x") == "x" else f"class{c}".encode()
                              for c in range(10)]}))
    for name, data in changes.items():
        (folder / name).write_bytes(data)
    return folder.parent


def test_cifar_with_str_keys_reads_like_bytes_keys(tmp_path):
    bytes_root = cifar10(tmp_path / "b/cifar-10-batches-py", np.random.default_rng(4))
    str_root = cifar10(tmp_path / "s/cifar-10-batches-py", np.random.default_rng(4),
                       key=lambda k: k)
    from_bytes, _ = prepare(tmp_path, "x", source="cifar10_lt", root=str(bytes_root))
    from_str, _ = prepare(tmp_path, "y", source="cifar10_lt", root=str(str_root))
    assert from_str["fingerprint"] == from_bytes["fingerprint"]
    assert from_str["class_names"][3] == "class3"


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def batch(**entries):
    return pickle.dumps({k.encode(): v for k, v in entries.items()})


GOOD_DATA = np.zeros((20, 3072), np.uint8)
MALFORMED = {
    "meta without names": ({"batches.meta": batch(names=[b"x"])},
                           "batches.meta has no 'label_names' entry"),
    "names not a list": ({"batches.meta": batch(label_names=5)},
                         "batches.meta: label_names is not a list of names"),
    "no data": ({"data_batch_2": batch(labels=[0] * 20)}, "data_batch_2 has no 'data' entry"),
    "no labels": ({"data_batch_2": batch(data=GOOD_DATA)}, "data_batch_2 has no 'labels' entry"),
    "wrong shape": ({"data_batch_2": batch(data=np.zeros((20, 100), np.uint8),
                                           labels=[0] * 20)},
                    "data_batch_2: 'data' is uint8 of shape (20, 100), expected uint8 rows"),
    "float data": ({"data_batch_2": batch(data=GOOD_DATA.astype(float), labels=[0] * 20)},
                   "data_batch_2: 'data' is float64"),
    "label count": ({"data_batch_2": batch(data=GOOD_DATA, labels=[0] * 19)},
                    "data_batch_2: 19 labels for 20 images"),
    "labels not ints": ({"data_batch_2": batch(data=GOOD_DATA, labels=["cat"] * 20)},
                        "data_batch_2: labels is not a list of integers"),
    "label out of range": ({"data_batch_2": batch(data=GOOD_DATA, labels=[10] * 20)},
                           "cifar-10-batches-py train: label 10 is outside 0..9"),
    "not a dict": ({"test_batch": pickle.dumps([1, 2, 3])},
                   "test_batch is not a CIFAR pickle (a list, not a dict)"),
    "truncated pickle": ({"test_batch": batch(data=GOOD_DATA, labels=[0] * 20)[:100]},
                         "test_batch is not a CIFAR pickle"),
    "code in the pickle": ({"test_batch": pickle.dumps({b"data": Boom()})},
                           "test_batch is not a CIFAR pickle (refusing to load posix.system"),
    "missing batch": ({}, "not a cifar-10-batches-py archive (no data_batch_5)"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_cifar_archive_is_one_line(tmp_path, case, monkeypatch):
    changes, message = MALFORMED[case]
    root = cifar10(tmp_path / "cifar-10-batches-py", np.random.default_rng(5), **changes)
    if case == "missing batch":
        (tmp_path / "cifar-10-batches-py/data_batch_5").unlink()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError) as error:
        prepare(tmp_path, source="cifar10_lt", root=str(root))
    assert message in one_line_error(error)
    assert not (tmp_path / "pwned.txt").exists()


# ---------------------------------------------------------------------------------------------
# 6-7. Damaged shards, hostile manifests

@pytest.fixture
def small_shards(tmp_path):
    root = image_folder(tmp_path / "folder", np.random.default_rng(6))
    manifest, out = prepare(tmp_path, source="image_folder", root=str(root), val_per_class=0,
                            test_per_class=1, imbalance_ratio=1)
    return manifest, out


def read_all(out, manifest, split="train"):
    batches = eval_loader(split_shards(str(out), manifest, split), batch_size=4,
                          image_size=8, workers=0)
    return sum(len(batch["labels"]) for batch in batches)


def rewrite_shard(path, change):
    """Rewrite tar shard `path` with `change(sample)` applied to every sample."""
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(change({k: v for k, v in sample.items() if not k.startswith("__")
                                 or k == "__key__"}))


def test_stream_names_the_corrupt_shard(small_shards):
    manifest, out = small_shards
    assert read_all(out, manifest) == 15
    shard = out / manifest["splits"]["train"]["shards"][1]["file"]
    original = shard.read_bytes()

    def damage(change):
        shard.write_bytes(original)
        rewrite_shard(shard, change)
        with pytest.raises(CorruptShardError) as error:
            read_all(out, manifest)
        message = one_line_error(error)
        assert message.startswith(f"{shard}: corrupt shard") and "rerun prepare" in message
        assert message.count("corrupt shard") == 1
        return message

    # The case: a sample without its image ("sample 000000224 has no jpg/png").
    assert "has no jpg/png" in damage(lambda s: {k: v for k, v in s.items() if k != "png"})
    assert "sample 000000004 is not an image" in damage(lambda s: {**s, "png": s["png"][:40]})
    assert "cannot be decoded: image file is truncated" in damage(
        lambda s: {**s, "png": s["png"][:-30]})
    assert "cannot be read" in damage(lambda s: {**s, "json": b"{not json"})
    shard.write_bytes(original[:700])  # a truncated tar
    with pytest.raises(CorruptShardError) as error:
        read_all(out, manifest)
    assert one_line_error(error).startswith(f"{shard}: corrupt shard")
    shard.unlink()
    with pytest.raises(CorruptShardError, match="shard not found; rerun prepare"):
        read_all(out, manifest)


def test_verify_shards_checks_every_sha256(small_shards):
    manifest, out = small_shards
    assert verify_shards(out) == []
    shards = manifest["splits"]["train"]["shards"]
    damaged, missing = out / shards[0]["file"], out / shards[2]["file"]
    data = bytearray(damaged.read_bytes())
    data[600] ^= 0x01  # one bit inside the first sample
    damaged.write_bytes(bytes(data))
    missing.unlink()
    problems = verify_shards(out)
    assert len(problems) == 2
    assert problems[0].startswith(f"{damaged}: train shard rows [0, 4] is corrupt (sha256")
    assert problems[1] == f"{missing}: train shard missing; rerun prepare (dvc repro prepare)"
    assert all("\n" not in p for p in problems)


@pytest.mark.parametrize("name", ["../../outside/evil.tar", "/etc/passwd", "..", "a/b.tar",
                                  "a\\..\\b.tar", 7, None])
def test_manifest_shard_names_must_stay_inside_the_folder(small_shards, name):
    manifest, out = small_shards
    outside = out.parent / "outside"
    outside.mkdir(exist_ok=True)
    shutil.copy(out / manifest["splits"]["train"]["shards"][0]["file"], outside / "evil.tar")
    manifest["splits"]["train"]["shards"][0]["file"] = name
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError) as error:
        split_shards(str(out), load_manifest(out), "train")
    assert f"shard name {name!r} is not a file name inside the folder" in one_line_error(error)
    problems = verify_shards(out)
    assert len(problems) == 1 and f"shard name {name!r}" in problems[0]


@pytest.mark.parametrize("text, message", [
    ('{"splits": {', "not valid JSON (Expecting property name"),
    ("", "not valid JSON (Expecting value"),
    ("[1, 2]", "not a manifest prepare wrote (no 'num_classes')"),
    ('{"num_classes": 3}', "not a manifest prepare wrote (no 'class_names')"),
])
def test_invalid_manifest_is_one_line(tmp_path, text, message):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(UserError) as error:
        load_manifest(tmp_path)
    assert one_line_error(error).startswith(f"{tmp_path}/manifest.json: {message}")
