"""Checkpoints: what `pipeline.train.loop.fit` writes every epoch, and the trained model they hold.

A checkpoint is a dict of tensors and plain data (model, optimizer, scheduler, epoch, metrics
and the run's identity: arch, num_classes, small_input, fingerprint, params), loaded with
`weights_only=True`. Training, the dump and evaluation all read it through here, so none of
them imports another to load a model.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.train.models import build_model

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` to `path` atomically: a crash mid-save never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by `fit`, loaded safely (tensors and plain data only); anything
    else (refused by weights_only, damaged, not this project's) is one line naming it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; train the model first "
                                "(dvc repro)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refused a global: maybe code
        raise UserError(f"{path}: not a checkpoint this project wrote, or unsafe to load "
                        f"(torch.load(weights_only=True) refused it: {_reason(error)}); use "
                        "the checkpoint.pt a training stage wrote") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as error:  # torn, not torch
        raise UserError(f"{path}: damaged or not a PyTorch checkpoint ({_reason(error)}); "
                        "delete it and rerun its training stage") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path}: not a checkpoint this project wrote (no 'model' entry); "
                        "use the checkpoint.pt a training stage wrote")
    return state


def _reason(error: Exception) -> str:
    """The telling sentence of torch.load's long, multi-line messages."""
    text = str(error)
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:  # which global weights_only refused
            text = line.split("WeightsUnpickler error:", 1)[1]
            break
    return text.strip().split(". ")[0].split("\n")[0][:200] or type(error).__name__


def load_model(checkpoint_path: str | Path) -> tuple[nn.Module, dict]:
    """A trained model (on the CPU, eval mode) and its checkpoint."""
    state = load_checkpoint(checkpoint_path)
    model = build_model(state["arch"], state["num_classes"], small_input=state["small_input"])
    model.load_state_dict(state["model"])
    return model.eval(), state
