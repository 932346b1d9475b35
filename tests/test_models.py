"""Model registry: explicit builders, torchvision names, small-input stems, clear errors."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.resnet import Bottleneck, ResNet

from pipeline.train.models import ARCHITECTURES, architectures, build_model

CHEAP = [name for name in ARCHITECTURES if name != "resnext101_32x4d"]


def _flops(model, images):
    with FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops()


@pytest.mark.parametrize("arch", CHEAP)
def test_explicit_architectures_give_logits(arch):
    model = build_model(arch, 7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_resnext101_32x4d_structure():
    model = build_model("resnext101_32x4d", 1000)
    assert isinstance(model, ResNet) and isinstance(model.layer1[0], Bottleneck)
    assert [len(layer) for layer in (model.layer1, model.layer2, model.layer3,
                                     model.layer4)] == [3, 4, 23, 3]
    assert model.layer1[0].conv2.groups == 32 and model.layer1[0].conv2.out_channels == 128
    # Published count for ResNeXt-101 32x4d (e.g. timm, pytorchcv): 44.18M.
    assert sum(parameter.numel() for parameter in model.parameters()) == 44_177_704
    small = build_model("resnext101_32x4d", 7)  # 32 px: the stem leaves 1x1 at layer4, cheap
    small.eval()
    with torch.no_grad():
        assert small(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize("arch", ["resnet18", "resnext101_32x4d", "wide_resnet50_2"])
def test_small_input_replaces_stem(arch):
    model = build_model(arch, 7, small_input=True)
    conv = model.conv1
    assert (conv.kernel_size, conv.stride, conv.out_channels, conv.bias) == ((3, 3), (1, 1),
                                                                             64, None)
    assert isinstance(model.maxpool, nn.Identity)
    if arch == "resnet18":
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_cifar_resnets_accept_small_input_unchanged():
    assert str(build_model("resnet8", 7, small_input=True)) == str(build_model("resnet8", 7))


def test_torchvision_names_build():
    model = build_model("mobilenet_v3_small", 7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="small_input only applies to ResNet-family"):
        build_model("mobilenet_v3_small", 7, small_input=True)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError) as error:
        build_model("resnet19", 7)
    message = str(error.value)
    assert "'resnet19'" in message and "Did you mean" in message
    for name in [*ARCHITECTURES, "mobilenet_v3_small", "vit_b_16"]:
        assert name in message
    names = architectures()
    assert len(names) == len(set(names)) and names[:len(ARCHITECTURES)] == list(ARCHITECTURES)


def test_cpu_teacher_is_at_least_twice_the_student():
    images = torch.randn(1, 3, 32, 32)
    assert _flops(build_model("resnet20", 10), images) >= 2 * _flops(
        build_model("resnet8", 10), images)


@pytest.mark.parametrize("arch", ["resnet8", "resnet18"])
def test_channels_last_and_bf16_autocast(arch):
    model = build_model(arch, 7, small_input=True).to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
    assert logits.shape == (2, 7) and logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert model.conv1.weight.grad is not None
