"""Model registry: a plain dict of explicit builders, plus any torchvision classifier by name.

Explicit builders (`ARCHITECTURES`): torchvision's resnet18 / resnet50, resnext101_32x4d (built
from torchvision's ResNet, which has no builder for it), and the CIFAR ResNets of He et al.
(2016) `resnet8` / `resnet14` / `resnet20` / `resnet32`, small enough to train on a 2-core CPU
for the embedded digits dataset. Every other name goes to `torchvision.models.get_model`.
All models are randomly initialised (weights=None).
"""

from __future__ import annotations

import difflib
from functools import partial
from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet, conv1x1, conv3x3


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet: 3x3 stem, three stages of `blocks` BasicBlocks.

    Stage widths are (16, 32, 64) * `width`, strides 1, 2, 2; depth = 6 * blocks + 2
    (mdistiller's resnet8 / resnet20 / resnet32, with 1x1-conv projection shortcuts).
    Input (B, 3, H, W) of any size (built for 32 px) -> logits (B, num_classes).
    """

    def __init__(self, blocks: int, num_classes: int, width: int = 1) -> None:
        super().__init__()
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, in_channels = [], widths[0]
        for out_channels, stride in zip(widths, (1, 2, 2)):
            downsample = None
            if stride != 1 or in_channels != out_channels:
                downsample = nn.Sequential(conv1x1(in_channels, out_channels, stride),
                                           nn.BatchNorm2d(out_channels))
            stage = [BasicBlock(in_channels, out_channels, stride, downsample)]
            stage += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            in_channels = out_channels
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():  # torchvision's ResNet initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.relu(self.bn1(self.conv1(images)))  # (B, 16w, H, W)
        features = self.layer3(self.layer2(self.layer1(features)))  # (B, 64w, H/4, W/4)
        return self.fc(torch.flatten(self.avgpool(features), 1))  # (B, num_classes)


def _resnext101_32x4d(num_classes: int) -> ResNet:
    # ResNeXt-101 32x4d (Xie et al. 2017): ~44.2M parameters with 1000 classes.
    return ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4,
                  num_classes=num_classes)


# name -> builder(num_classes) -> nn.Module
ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": partial(torchvision.models.resnet18, weights=None),
    "resnet50": partial(torchvision.models.resnet50, weights=None),
    "resnext101_32x4d": _resnext101_32x4d,
    "resnet8": partial(CifarResNet, 1),  # CPU student for the embedded dataset
    "resnet14": partial(CifarResNet, 2),
    "resnet20": partial(CifarResNet, 3),  # CPU teacher for the embedded dataset
    "resnet32": partial(CifarResNet, 5),
}

# CIFAR ResNets already have the small-input stem; small_input changes nothing for them.
_NATIVE_SMALL_INPUT = (CifarResNet,)


def torchvision_architectures() -> list[str]:
    """Names of torchvision's classification models (not detection, video, ...)."""
    return torchvision.models.list_models(module=torchvision.models)


def architectures() -> list[str]:
    """Every name `build_model` accepts: the explicit ones first, then torchvision's."""
    return list(ARCHITECTURES) + [name for name in torchvision_architectures()
                                  if name not in ARCHITECTURES]


def unknown_architecture(arch: str) -> str | None:
    """None when `build_model` knows `arch`, else a one-line message with close names."""
    if arch in ARCHITECTURES or arch in torchvision_architectures():
        return None
    close = difflib.get_close_matches(arch, architectures(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (f"unknown architecture {arch!r}.{hint} Known: {', '.join(ARCHITECTURES)}, or any "
            f"torchvision classification model: {', '.join(torchvision_architectures())}")


def build_model(arch: str, num_classes: int, *, small_input: bool = False) -> nn.Module:
    """A randomly initialised classifier: (B, 3, H, W) float -> (B, num_classes) logits.

    small_input: for 32 px images (CIFAR-style), a ResNet/ResNeXt gets a 3x3 stride-1 conv1
    (64 channels, no bias) and no max-pool, so the last stage sees 4x4 instead of 1x1.
    """
    if arch in ARCHITECTURES:
        model = ARCHITECTURES[arch](num_classes=num_classes)
    elif arch in torchvision_architectures():
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    else:
        raise ValueError(unknown_architecture(arch))
    if small_input and not isinstance(model, _NATIVE_SMALL_INPUT):
        if not isinstance(model, ResNet):
            raise ValueError(f"small_input only applies to ResNet-family models "
                             f"(resnet*, resnext*, wide_resnet*), not {arch!r}; set "
                             "small_input: false or pick a ResNet")
        # 64 channels: the in-channels torchvision's layer1 expects after the stem.
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model
