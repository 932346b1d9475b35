import json
import pickle

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner

from helpers import save_image
from pipeline.params import DataParams
from pipeline.data.shards import prepare_shards
from pipeline.data.manifest import load_manifest
from pipeline.data.sources import SourceError, long_tail_counts
from pipeline.stream.loader import split_shards
from stages.prepare import main as prepare_stage


def prepare(tmp_path, name="shards", **options):
    options = {"workers": 0, "shard_size": 4, **options}
    out = tmp_path / name
    return prepare_shards(DataParams(**options), 0, out), out


def read_split(out, manifest, split):
    return list(wds.WebDataset([s.url for s in split_shards(str(out), manifest, split)], shardshuffle=False))


def assert_rows_contiguous(manifest, split):
    info = manifest["splits"][split]
    ranges = [s["rows"] for s in info["shards"]]
    assert ranges[0][0] == 0 and ranges[-1][1] == info["rows"]
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_every_registered_source_has_a_loader_and_its_fixed_class_count():
    """pipeline/data/registry.py is the one list of sources: each entry's loader exists, and a
    class count the params check before prepare is the one the source produces."""
    from sklearn.datasets import load_digits

    from pipeline.data import glyphs
    from pipeline.data.registry import DATA_SOURCES
    from pipeline.data.sources import LOADERS

    assert {entry.loader for entry in DATA_SOURCES.values()} == set(LOADERS)
    fixed = {name: entry.num_classes for name, entry in DATA_SOURCES.items() if entry.num_classes}
    assert fixed == {"digits_lt": len(load_digits().target_names), "cifar10_lt": 10,
                     "cifar100_lt": 100, "glyphs_lt": len(glyphs.CHARACTERS)}


def test_long_tail_profile():
    assert long_tail_counts(100, 3, 10.0) == [100, 31, 10]
    assert long_tail_counts(5000, 10, 100.0)[-1] == 50
    assert long_tail_counts(7, 1, 10.0) == [7]


def test_digits_lt_counts_follow_profile_exactly(tmp_path):
    manifest, out = prepare(tmp_path, shard_size=64)
    assert manifest["num_classes"] == 10
    assert manifest["train_counts"] == long_tail_counts(104, 10, 10.0)
    assert manifest["splits"]["train"]["rows"] == sum(manifest["train_counts"]) == 421
    assert manifest["splits"]["val"]["rows"] == 200 and manifest["splits"]["test"]["rows"] == 500
    for split in ("train", "val", "test"):
        assert_rows_contiguous(manifest, split)
    samples = read_split(out, manifest, "train")
    assert [json.loads(s["json"])["row"] for s in samples] == list(range(421))
    first = samples[0]
    assert set(first) >= {"__key__", "png", "cls", "json"}
    meta = json.loads(first["json"])
    assert meta["label"] == int(first["cls"]) and (meta["width"], meta["height"]) == (32, 32)
    counts = np.bincount([int(s["cls"]) for s in samples], minlength=10)
    assert counts.tolist() == manifest["train_counts"]


def test_same_params_give_byte_identical_shards(tmp_path):
    first, out_a = prepare(tmp_path, "a", shard_size=100)
    second, out_b = prepare(tmp_path, "b", shard_size=100, workers=2)  # parallel path too
    assert first["fingerprint"] == second["fingerprint"]
    for path in sorted(out_a.glob("*.tar")):
        assert path.read_bytes() == (out_b / path.name).read_bytes()


def test_rerun_replaces_output_and_leaves_no_partial(tmp_path):
    prepare(tmp_path, shard_size=100)
    manifest, out = prepare(tmp_path, shard_size=200)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]
    assert {p.name for p in out.glob("train-*.tar")} == {s["file"] for s in
                                                         manifest["splits"]["train"]["shards"]}


def test_split_lists_source(tmp_path, imagenet_lt_tree):
    root, lists = imagenet_lt_tree
    manifest, out = prepare(tmp_path, source="split_lists", root=str(root),
                            train_list=str(lists["train"]), val_list=str(lists["val"]),
                            test_list=str(lists["test"]))
    assert manifest["train_counts"] == [6, 3, 2]
    assert manifest["class_names"] == ["n00000", "n00001", "n00002"]
    assert {k: v["rows"] for k, v in manifest["splits"].items()} == {
        "train": 11, "val": 3, "test": 6}
    assert_rows_contiguous(manifest, "train")
    assert [len(s["shards"]) for s in manifest["splits"].values()] == [3, 1, 2]
    samples = read_split(out, manifest, "train")
    assert all("jpg" in s for s in samples)
    for sample in samples:  # original bytes kept: the listed file is byte-identical
        meta = json.loads(sample["json"])
        assert sample["jpg"] == (root / meta["path"]).read_bytes()


def test_split_lists_reencode_keeps_original_size(tmp_path, imagenet_lt_tree):
    root, lists = imagenet_lt_tree
    manifest, out = prepare(tmp_path, source="split_lists", root=str(root), max_side=16,
                            train_list=str(lists["train"]), test_list=str(lists["test"]))
    assert "val" not in manifest["splits"]
    from PIL import Image
    import io
    for sample in read_split(out, manifest, "train"):
        meta = json.loads(sample["json"])
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert max(image.size) == 16
        assert (meta["width"], meta["height"]) == Image.open(root / meta["path"]).size


def test_split_lists_bad_inputs(tmp_path, imagenet_lt_tree):
    root, lists = imagenet_lt_tree
    good = dict(source="split_lists", root=str(root), train_list=str(lists["train"]),
                test_list=str(lists["test"]))
    with pytest.raises(SourceError, match="folder not found"):
        prepare(tmp_path, **{**good, "root": str(tmp_path / "nowhere")})
    with pytest.raises(SourceError, match="split list not found"):
        prepare(tmp_path, **{**good, "train_list": str(tmp_path / "none.txt")})
    with pytest.raises(SourceError, match=r"label 3 is outside 0..2"):
        prepare(tmp_path, **{**good, "num_classes": 3, "test_list": str(
            _write(tmp_path / "t.txt", "test/n00000/n00000_0.JPEG 3\n"))})
    with pytest.raises(SourceError, match="class 1 has no train images"):
        prepare(tmp_path, **{**good, "train_list": str(_write(
            tmp_path / "tr.txt", "train/n00000/n00000_0.JPEG 0\ntrain/n00002/n00002_0.JPEG 2\n"))})
    with pytest.raises(SourceError, match=r"tr2.txt:2: expected 'relative/path label'"):
        prepare(tmp_path, **{**good, "train_list": str(_write(
            tmp_path / "tr2.txt", "train/n00000/n00000_0.JPEG 0\nno_label_here\n"))})
    assert not (tmp_path / "shards").exists()


def _write(path, text):
    path.write_text(text)
    return path


def test_missing_and_corrupt_images_fail_or_are_skipped(tmp_path, imagenet_lt_tree):
    root, lists = imagenet_lt_tree
    (root / "train/n00000/n00000_1.JPEG").unlink()
    (root / "train/n00000/n00000_2.JPEG").write_bytes(b"\xff\xd8 not a jpeg")
    options = dict(source="split_lists", root=str(root), train_list=str(lists["train"]),
                   test_list=str(lists["test"]))
    with pytest.raises(SourceError, match=r"n00000_[12].JPEG: (image not found|cannot decode "
                                         r"image).*skip_bad_images"):
        prepare(tmp_path, **options)
    assert not (tmp_path / "shards").exists() and not (tmp_path / "shards.partial").exists()
    for name in ("n00000_1.JPEG", "n00000_2.JPEG"):  # one at a time, so the message is known
        with pytest.raises(SourceError, match=f"{name}: " + (
                "image not found" if name.endswith("1.JPEG") else "cannot decode image")):
            prepare(tmp_path, **{**options, "num_classes": 3, "train_list": str(_write(
                tmp_path / "one.txt", f"train/n00000/{name} 0\ntrain/n00001/n00001_0.JPEG 1\n"
                "train/n00002/n00002_0.JPEG 2\n"))})
    manifest, out = prepare(tmp_path, skip_bad_images=True, **options)
    assert manifest["skipped"]["count"] == 2
    assert sorted(manifest["skipped"]["paths"]) == [
        "train/n00000/n00000_1.JPEG", "train/n00000/n00000_2.JPEG"]
    assert manifest["train_counts"] == [4, 3, 2]
    assert_rows_contiguous(manifest, "train")
    assert len(read_split(out, manifest, "train")) == 9


def test_cifar10_lt_from_folder_and_tarball(tmp_path, cifar10_folder, cifar10_tarball):
    from_folder, out = prepare(tmp_path, "a", source="cifar10_lt",
                               root=str(cifar10_folder.parent), imbalance_ratio=10)
    from_tarball, _ = prepare(tmp_path, "b", source="cifar10_lt", root=str(cifar10_tarball),
                              imbalance_ratio=10)
    assert from_folder["fingerprint"] == from_tarball["fingerprint"]
    assert from_folder["train_counts"] == long_tail_counts(20, 10, 10.0)
    assert from_folder["class_names"][3] == "class3"
    assert from_folder["splits"]["test"]["rows"] == 50
    sample = read_split(out, from_folder, "test")[0]
    assert json.loads(sample["json"])["width"] == 32


def test_cifar_archive_that_is_not_one(tmp_path, cifar10_folder):
    bogus = tmp_path / "bogus.tar.gz"
    bogus.write_bytes(b"definitely not a tarball")
    with pytest.raises(SourceError, match="not a CIFAR python archive"):
        prepare(tmp_path, source="cifar10_lt", root=str(bogus))
    with pytest.raises(SourceError, match="not a cifar-100-python archive"):
        prepare(tmp_path, source="cifar100_lt", root=str(cifar10_folder))
    (cifar10_folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(SourceError, match="data_batch_3 is not a CIFAR pickle"):
        prepare(tmp_path, source="cifar10_lt", root=str(cifar10_folder))


def test_cifar100_lt(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, count in (("train", 300), ("test", 100)):
        (folder / name).write_bytes(pickle.dumps({
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            b"fine_labels": [i % 100 for i in range(count)]}))
    (folder / "meta").write_bytes(pickle.dumps(
        {b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))
    manifest, _ = prepare(tmp_path, source="cifar100_lt", root=str(tmp_path),
                          imbalance_ratio=3, shard_size=50)
    assert manifest["train_counts"] == long_tail_counts(3, 100, 3.0)
    assert manifest["num_classes"] == 100


def test_image_folder_with_long_tail(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "folder"
    for label, name in enumerate(["cat", "dog", "eel"]):
        for i in range(12):
            save_image(root / name / f"{i}.png", rng, fmt="PNG")
    manifest, out = prepare(tmp_path, source="image_folder", root=str(root),
                            val_per_class=1, test_per_class=2, imbalance_ratio=4)
    assert manifest["class_names"] == ["cat", "dog", "eel"]
    assert manifest["train_counts"] == [9, 4, 2]
    assert manifest["splits"]["val"]["rows"] == 3 and manifest["splits"]["test"]["rows"] == 6
    balanced, _ = prepare(tmp_path, "b", source="image_folder", root=str(root),
                          val_per_class=0, test_per_class=2, imbalance_ratio=1)
    assert balanced["train_counts"] == [10, 10, 10] and "val" not in balanced["splits"]
    with pytest.raises(SourceError, match="class 'cat' has 12 images"):
        prepare(tmp_path, "c", source="image_folder", root=str(root), test_per_class=12)


def test_prepare_stage_cli(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data: {shard_size: 200, workers: 0}\n")
    out = tmp_path / "shards"
    result = CliRunner().invoke(prepare_stage, ["--params", str(params), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "10 classes" in result.output
    assert load_manifest(out)["splits"]["train"]["rows"] == 421
    params.write_text("data: {shard_size: -1}\n")
    result = CliRunner().invoke(prepare_stage, ["--params", str(params), "--out", str(out)])
    assert result.exit_code == 1
    assert "data.shard_size: expected an integer >= 1, got -1" in result.output
    assert "Traceback" not in result.output
