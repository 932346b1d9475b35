"""Shards and logit stores through fsspec URLs (here fsspec's in-memory filesystem, standing
in for s3://, gs://, ...): prepare writes locally, everything after reads (and the dump
writes) by URL."""

import fsspec
import numpy as np
import pytest
import torch

from helpers import TRAIN_ROWS, params_from, with_changes
from pipeline.train.runs import train_student
from pipeline.store.dump import dump_logits
from pipeline.data.manifest import load_manifest
from pipeline.store import open_store
from pipeline.stream.views import ViewSource
from pipeline.stream.loader import split_shards, train_loader


@pytest.fixture
def shards_url(stage_one_data):
    memory = fsspec.filesystem("memory")
    memory.put(str(stage_one_data.shards_dir), "/url_test/shards", recursive=True)
    yield "memory://url_test/shards"
    memory.rm("/url_test", recursive=True)


def test_shards_and_store_by_url(stage_one_data, teacher_checkpoint, shards_url, tmp_path):
    data = stage_one_data
    manifest = load_manifest(shards_url)
    assert manifest == data.manifest
    shards = split_shards(shards_url, manifest, "train")
    assert shards[0].url == "memory://url_test/shards/train-000000.tar"
    batches = list(train_loader(shards, ViewSource(data.params.seed, 0), batch_size=8,
                                image_size=8, workers=0))
    assert sorted(r for b in batches for r in b["rows"].tolist()) == list(range(TRAIN_ROWS))

    store_url = "memory://url_test/teacher.zarr"
    dump_logits(data.params, "teacher", shards_url, str(teacher_checkpoint), store_url)
    local = tmp_path / "local.zarr"
    dump_logits(data.params, "teacher", str(data.shards_dir), str(teacher_checkpoint),
                str(local))
    by_url, on_disk = open_store(store_url), open_store(str(local))
    assert by_url.attributes == on_disk.attributes
    # the quantised tail too: its per-view arrays and the store's basis
    assert {"tail_coefficients", "tail_residuals"} <= set(by_url.array_names)
    for name in ("mean", "basis", "scales"):
        assert torch.equal(getattr(by_url.tail_basis, name), getattr(on_disk.tail_basis, name))
    for view in range(by_url.views):
        read = on_disk.read_rows(view, 0, TRAIN_ROWS)
        assert "tail_residuals" in read
        for name, values in read.items():
            assert np.array_equal(by_url.read_rows(view, 0, TRAIN_ROWS)[name], values), name
        assert np.array_equal(by_url.teacher_logits(view, 0, TRAIN_ROWS),
                              on_disk.teacher_logits(view, 0, TRAIN_ROWS))

    metrics = train_student(data.params, shards_url, store_url, str(teacher_checkpoint),
                            str(tmp_path / "student"), str(tmp_path / "live"))
    assert np.isfinite(metrics["train/loss"])


def test_a_store_by_url_is_kept_or_replaced_beside_itself(stage_one_data, teacher_checkpoint,
                                                          shards_url, capsys):
    """The rerun logic through fsspec: a complete matching store is kept; other params build
    `<url>.next` and move it over the old store once complete (fsspec's mv on the URL's
    filesystem)."""
    data = stage_one_data
    memory = fsspec.filesystem("memory")
    store_url = "memory://url_test/logits/teacher.zarr"
    dump_logits(data.params, "teacher", shards_url, str(teacher_checkpoint), store_url)
    files = {path: memory.cat_file(path) for path in memory.find("/url_test/logits")}
    capsys.readouterr()
    dump_logits(data.params, "teacher", shards_url, str(teacher_checkpoint), store_url)
    assert "kept as it is" in capsys.readouterr().out
    assert {path: memory.cat_file(path) for path in memory.find("/url_test/logits")} == files

    params = params_from(with_changes(data.raw, "logits", topk=3))
    dump_logits(params, "teacher", shards_url, str(teacher_checkpoint), store_url)
    assert memory.ls("/url_test/logits", detail=False) == ["/url_test/logits/teacher.zarr"]
    store = open_store(store_url)
    assert store.complete and store.topk == 3 and store.exact_logits
