"""Model registry: a plain dict of explicit builders, plus any torchvision classifier by name.

Explicit builders (`ARCHITECTURES`): torchvision's resnet18 / resnet50, resnext101_32x4d (built
from torchvision's ResNet, which has no builder for it), and the CIFAR ResNets of He et al.
(2016) `resnet8` / `resnet14` / `resnet20` / `resnet32`, small enough to train on a 2-core CPU
for the embedded digits dataset. Every other name goes to `torchvision.models.get_model`, and
`timm/<name>` to `timm.create_model` (timm is the optional extra `pip install -e '.[timm]'`).
All models are built randomly initialised (nothing is downloaded); `load_weights` then fills
one from a weights file saved by torchvision, timm or this project.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet, conv1x1, conv3x3

from pipeline.errors import UserError

TIMM_PREFIX = "timm/"  # arch "timm/<name>": any model timm builds by name


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
    if arch.startswith(TIMM_PREFIX):
        model = _build_timm(arch[len(TIMM_PREFIX):], num_classes)
    elif arch in ARCHITECTURES:
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


def _build_timm(name: str, num_classes: int) -> nn.Module:
    """timm model `name`, randomly initialised (pretrained=False: never a download)."""
    try:
        import timm
    except ImportError:
        raise UserError(f"arch {TIMM_PREFIX}{name} needs timm: pip install -e '.[timm]'") \
            from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise UserError(f"arch {TIMM_PREFIX}{name}: timm {timm.__version__} has no model "
                        f"{name!r}{hint} (`timm.list_models()` lists them)")
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# Weights from a file: a plain state_dict or a checkpoint wrapping one.

# Where checkpoints keep their state_dict: Lightning and timm's train script; this project,
# DeiT and torchvision's reference scripts; many training scripts; DeepSpeed.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
KEY_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


def classifier_head(model: nn.Module) -> str:
    """Dotted name of the model's classification layer: timm's own record of it, else the last
    nn.Linear (the last Conv2d for the few without one, e.g. squeezenet)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if isinstance(cfg.get("classifier"), str):  # timm models; tuples are distilled twin heads
        return cfg["classifier"]
    modules = list(model.named_modules())
    for kind in (nn.Linear, nn.Conv2d):
        names = [name for name, module in modules if isinstance(module, kind)]
        if names:
            return names[-1]
    raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer to call its head")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: .safetensors, or a torch.save file read with
    weights_only=True (a state_dict, or a checkpoint holding one under `state_dict`, `model`,
    ...); DDP's `module.` and torch.compile's `_orig_mod.` prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # installed with timm
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refused, not a torch file, truncated, ...
        raise UserError(f"{path}: cannot read it as weights ({type(error).__name__}: "
                        f"{load_reason(error)}); save a state_dict with "
                        "torch.save(model.state_dict(), path)") from None
    while isinstance(state, Mapping) and not _is_state_dict(state):
        inner = next((state[key] for key in WRAPPER_KEYS if isinstance(state.get(key), Mapping)),
                     None)
        if inner is None:
            raise UserError(f"{path}: no state_dict in it (keys: {', '.join(map(str, state))}"
                            f"; looked under {', '.join(WRAPPER_KEYS)})")
        state = inner
    if not isinstance(state, Mapping):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a state_dict")
    for prefix in KEY_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return dict(state)


def load_reason(error: Exception) -> str:
    """The telling sentence of torch.load's long, multi-line messages."""
    text = str(error)
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:  # which global weights_only refused
            text = line.split("WeightsUnpickler error:", 1)[1]
            break
    first = text.strip().split(". ")[0].split("\n")[0][:200]
    if "weights_only" in first or "Weights only" in first:
        # never relay torch's advice to load with weights_only=False: it runs the file's code
        return "it holds objects other than tensors and plain data"
    return first or type(error).__name__


def _is_state_dict(state: Mapping) -> bool:
    return bool(state) and all(isinstance(value, torch.Tensor) for value in state.values())


def load_weights(model: nn.Module, path: str | Path, *, reset_head: bool = False) -> nn.Module:
    """Fill `model` (built for C classes) with the weights in `path`, in place.

    A head trained for another number of classes is refused, unless `reset_head`, which keeps
    the model's own freshly initialised head (to be trained) and loads everything else.
    Any other missing, unexpected or mis-shaped tensor is an error naming it.
    """
    state = read_state_dict(path)
    head = classifier_head(model)
    own = model.state_dict()
    head_keys = [key for key in own if key.startswith(head + ".")]
    head_weight = state.get(f"{head}.weight")
    num_classes = own[f"{head}.weight"].shape[0]
    if reset_head:
        state = {key: value for key, value in state.items() if key not in head_keys}
    elif head_weight is not None and head_weight.shape[0] != num_classes:
        raise UserError(f"{path}: head {head}.weight has shape {tuple(head_weight.shape)} "
                        f"({head_weight.shape[0]} classes), the data has C = {num_classes}; "
                        "set reset_head: true to re-initialise the head and train it")
    wrong = [f"{key} {tuple(value.shape)} (model {tuple(own[key].shape)})"
             for key, value in state.items() if key in own and own[key].shape != value.shape]
    # Files from before BatchNorm counted its batches lack num_batches_tracked: keep the model's.
    missing = [key for key in own if key not in state
               and not (reset_head and key in head_keys)
               and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in own]
    for problem, keys in (("mis-shaped", wrong), ("missing", missing),
                          ("unexpected", unexpected)):
        if keys:
            raise UserError(f"{path}: does not fit {type(model).__name__} ({len(keys)} "
                            f"{problem} tensors, e.g. {', '.join(keys[:3])}); check arch and "
                            "small_input against the model the file was saved from")
    model.load_state_dict(state, strict=False)  # checked above, with clearer messages
    return model
