"""`teachers.NAME.seed`: a teacher's own seed draws its initial weights and its row order only;
null is the global `seed`, bit for bit. The data and the views stay the global seed's."""

import pytest
import torch

import pipeline.train.runs
from helpers import params_from, with_changes
from pipeline.train.runs import train_teacher


class Recorder:
    """Stands in for `fit`: keeps the initial weights and the first epoch's rows and views."""

    def __init__(self):
        self.weights, self.rows, self.boxes = None, [], {}  # boxes: row -> its crop's pixel sum

    def fit(self, model, run, out_dir, live_dir):
        self.weights = {k: v.clone() for k, v in model.state_dict().items()}
        for batch in run.train_batches(0):
            rows = batch["rows"].tolist()
            self.rows += rows
            self.boxes.update(zip(rows, batch["images"].float().sum(dim=(1, 2, 3)).tolist()))
        return {}


def first_epoch(data, monkeypatch, tmp_path, **teacher):
    recorder = Recorder()
    monkeypatch.setattr(pipeline.train.runs, "fit", recorder.fit)
    params = params_from(with_changes(data.raw, "teachers.teacher", **teacher))
    train_teacher(params, "teacher", str(data.shards_dir), str(tmp_path / "out"),
                  str(tmp_path / "live"))
    return recorder


def test_teacher_seed_draws_weights_and_row_order_only(stage_one_data, monkeypatch, tmp_path):
    default = first_epoch(stage_one_data, monkeypatch, tmp_path)  # seed: null -> `seed` (3)
    same = first_epoch(stage_one_data, monkeypatch, tmp_path, seed=stage_one_data.params.seed)
    other = first_epoch(stage_one_data, monkeypatch, tmp_path, seed=7)
    assert stage_one_data.params.teachers["teacher"].seed is None
    # null is the global seed, bit for bit: weights, row order and views.
    assert default.rows == same.rows and default.boxes == same.boxes
    assert all(torch.equal(default.weights[k], same.weights[k]) for k in default.weights)
    # Another seed: other initial weights and another row order ...
    assert default.rows != other.rows
    assert not torch.equal(default.weights["fc.weight"], other.weights["fc.weight"])
    # ... with the same view of every row (the views are the global seed's). drop_last drops
    # 2 of the 26 rows: which ones depends on the order.
    shared = set(default.rows) & set(other.rows)
    assert len(default.rows) == len(other.rows) == 24 and len(shared) >= 22
    assert all(default.boxes[row] == other.boxes[row] for row in shared)


def test_teacher_seed_is_validated(stage_one_data):
    from pipeline.errors import UserError

    with pytest.raises((UserError, ValueError), match="seed"):
        params_from(with_changes(stage_one_data.raw, "teachers.teacher", seed=-1))
