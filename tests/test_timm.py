"""`arch: timm/<name>`: any timm model by name, built without a download, trained by the same
loop, loaded from its checkpoint, and filled from a timm state_dict (heads by timm's record)."""

import pytest
import torch

from helpers import params_from, with_changes
from pipeline.train.runs import load_model, train_teacher
from pipeline.errors import UserError
from pipeline.train.models import build_model, classifier_head, load_weights

# In the `test` extra, so the README's test command runs these; skip only without it.
timm = pytest.importorskip(
    "timm", reason="timm is not installed: pip install -e '.[test]' (or '.[timm]') adds it")

SMALL = "timm/test_resnet"  # timm's 0.37M-parameter test ResNet: a CPU step in a fraction of a s


def test_timm_model_by_name_without_download():
    model = build_model(SMALL, 3)
    assert isinstance(model, timm.models.ResNet)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    assert classifier_head(build_model("timm/test_vit", 3)) == "head"
    with pytest.raises(UserError, match="timm/test_resnt: timm .* has no model 'test_resnt'; "
                                        "did you mean timm/test_resnet"):
        build_model("timm/test_resnt", 3)


def test_timm_model_trains_one_step(stage_one_data, tmp_path):
    data = stage_one_data
    # batch 32 > 26 train rows: one step per epoch
    raw = with_changes(data.raw, "teachers.teacher", arch=SMALL, epochs=1, batch_size=16)
    torch.manual_seed(data.params.seed)
    before = build_model(SMALL, 3).state_dict()
    metrics = train_teacher(params_from(raw), "teacher", str(data.shards_dir),
                            str(tmp_path / "teacher"), str(tmp_path / "live"))
    assert metrics["train/loss"] > 0 and 0 <= metrics["val/top1"] <= 100
    model, state = load_model(tmp_path / "teacher" / "checkpoint.pt")
    assert state["arch"] == SMALL and state["epoch"] == 0
    assert not torch.equal(model.state_dict()["fc.weight"], before["fc.weight"])  # it stepped


def test_timm_weights_with_another_head(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("test_resnet", pretrained=False, num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "test_resnet_in1k.pth")
    with pytest.raises(UserError, match=r"head fc.weight has shape \(1000, \d+\)"):
        load_weights(build_model(SMALL, 3), tmp_path / "test_resnet_in1k.pth")
    model = load_weights(build_model(SMALL, 3), tmp_path / "test_resnet_in1k.pth",
                         reset_head=True)
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(model.state_dict()[key], value), key
    assert model.fc.out_features == 3
