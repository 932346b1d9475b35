import io
import json

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from pipeline.data import glyphs, sources
from pipeline.tools.cli import cli
from pipeline.params import DataParams, load_params
from pipeline.tools.presets import GLYPHS_LT_PARAMS
from pipeline.data.shards import prepare_shards
from pipeline.data.sources import long_tail_counts
from pipeline.stream.loader import split_shards

SMALL = {"source": "glyphs_lt", "image_size": 16, "imbalance_ratio": 4.0, "val_per_class": 1,
         "test_per_class": 2, "shard_size": 128, "workers": 0}


@pytest.fixture
def small_head(monkeypatch):
    """8 train images in the head class instead of 400: about 900 renders in all."""
    monkeypatch.setattr(glyphs, "MAX_TRAIN_PER_CLASS", 8)


def prepare(tmp_path, name, **options):
    out = tmp_path / name
    return prepare_shards(DataParams(**{**SMALL, **options}), 0, out), out


def labels_of(out, manifest, split):
    urls = [s.url for s in split_shards(str(out), manifest, split)]
    return [int(s["cls"]) for s in wds.WebDataset(urls, shardshuffle=False)]


def test_real_config_counts_without_rendering():
    counts = sources.glyphs_split_counts(DataParams(source="glyphs_lt", imbalance_ratio=100))
    assert counts["train"] == long_tail_counts(400, 100, 100.0)
    assert (counts["train"][0], counts["train"][-1], sum(counts["train"])) == (400, 4, 8668)
    assert counts["val"] == [20] * 100 and counts["test"] == [50] * 100


def test_one_hundred_distinct_classes_present_in_every_font():
    from matplotlib.ft2font import FT2Font

    assert len(glyphs.CHARACTERS) == len(set(glyphs.CHARACTERS)) == 100
    assert len(glyphs.FONT_FILES) == 16
    for font_file in glyphs.FONT_FILES:  # a missing glyph would render as the same box
        font = FT2Font(str(glyphs.font_dir() / font_file))
        missing = [c for c in glyphs.CHARACTERS if font.get_char_index(ord(c)) == 0]
        assert not missing, f"{font_file} lacks {missing}"


def test_prepare_counts_balanced_splits_and_names(tmp_path, small_head):
    manifest, out = prepare(tmp_path, "shards")
    assert manifest["num_classes"] == 100
    assert manifest["class_names"] == list(glyphs.CHARACTERS)
    assert manifest["train_counts"] == long_tail_counts(8, 100, 4.0)
    assert np.bincount(labels_of(out, manifest, "train"), minlength=100).tolist() == (
        manifest["train_counts"])
    assert np.bincount(labels_of(out, manifest, "test"), minlength=100).tolist() == [2] * 100
    assert np.bincount(labels_of(out, manifest, "val"), minlength=100).tolist() == [1] * 100
    first = next(iter(wds.WebDataset(split_shards(str(out), manifest, "test")[0].url,
                                     shardshuffle=False)))
    assert Image.open(io.BytesIO(first["png"])).size == (16, 16)
    assert json.loads(first["json"])["path"] == "glyphs/test/0/0"


def test_same_seed_gives_byte_identical_shards(tmp_path, small_head):
    first, out_a = prepare(tmp_path, "a")
    second, out_b = prepare(tmp_path, "b", workers=2)
    assert first["fingerprint"] == second["fingerprint"]
    tars = sorted(out_a.glob("*.tar"))
    assert tars and all(p.read_bytes() == (out_b / p.name).read_bytes() for p in tars)
    other = prepare_shards(DataParams(**SMALL), 1, tmp_path / "c")
    assert other["fingerprint"] != first["fingerprint"]


def test_a_sample_depends_only_on_its_key():
    one = glyphs.render_glyph("o", 16, glyphs.sample_rng(0, "train", 18, 3))
    glyphs.render_glyph("x", 16, glyphs.sample_rng(0, "train", 18, 2))  # other draws between
    again = glyphs.render_glyph("o", 16, glyphs.sample_rng(0, "train", 18, 3))
    assert one.shape == (16, 16, 3) and one.dtype == np.uint8
    assert np.array_equal(one, again)
    assert not np.array_equal(one, glyphs.render_glyph(
        "o", 16, glyphs.sample_rng(0, "test", 18, 3)))


def test_classes_render_differently_and_never_blank():
    """Same draws for every class (same generator seed): only the character differs."""
    images = [glyphs.render_glyph(c, 32, np.random.default_rng(7)) for c in glyphs.CHARACTERS]
    assert len({image.tobytes() for image in images}) == 100
    for character in glyphs.CHARACTERS:  # every glyph covers a visible part of the canvas
        mask = glyphs._glyph_mask(character, 64, np.random.default_rng(3))
        assert 0.01 < mask.mean() < 0.9, character
    confusable = [images[glyphs.CHARACTERS.index(c)].astype(int) for c in "oO0"]
    assert all(np.abs(a - b).mean() > 1 for a in confusable for b in confusable
               if a is not b)


def test_preset_is_valid_and_listed():
    params = load_params(GLYPHS_LT_PARAMS)
    assert (params.data.source, params.data.imbalance_ratio, params.data.image_size) == (
        "glyphs_lt", 100.0, 32)
    assert params.student.loss == "ikl" and params.student.arch == (
        params.teachers["baseline"].arch)
    assert (params.logits.views, params.logits.topk) == (8, 5)
    assert params.augment.flip_probability == 0.0  # b / d, p / q
    result = CliRunner().invoke(cli, ["presets"])
    assert result.exit_code == 0
    assert f"cp {GLYPHS_LT_PARAMS} params.yaml && dvc repro" in result.output
