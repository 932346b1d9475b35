"""Checkpoints: what `pipeline.train.fit` writes every epoch, and the trained model they hold.

A checkpoint is a dict of tensors and plain data (model, optimizer, scheduler, epoch, metrics
and the run's identity: arch, num_classes, small_input, fingerprint, params), loaded with
`weights_only=True`. Training, the dump and evaluation all read it through here, so none of
them imports another to load a model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from pipeline.models import build_model

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` to `path` atomically: a crash mid-save never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by `fit`, loaded safely (tensors and plain data only)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; train the model first "
                                "(dvc repro)")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(checkpoint_path: str | Path) -> tuple[nn.Module, dict]:
    """A trained model (on the CPU, eval mode) and its checkpoint."""
    state = load_checkpoint(checkpoint_path)
    model = build_model(state["arch"], state["num_classes"], small_input=state["small_input"])
    model.load_state_dict(state["model"])
    return model.eval(), state
