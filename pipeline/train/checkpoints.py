"""Checkpoints: what `pipeline.train.loop.fit` writes every epoch, and the trained model they hold.

A checkpoint is a dict of tensors and plain data (model, optimizer, scheduler, epoch, metrics
and the run's identity: arch, num_classes, small_input, fingerprint, params), loaded with
`weights_only=True`. Training, the dump and evaluation all read it through here, so none of
them imports another to load a model.

Integrity: `save_checkpoint` adds INTEGRITY, the sha256 of everything else in the dict (every
tensor's dtype, shape and bytes, every plain value), and `load_checkpoint` recomputes it on every
load and resume. A flipped byte either breaks the file (torch cannot read it) or changes a value
and with it the digest: both are one line naming the file, and the checkpoint is never used.
(The zip format torch writes has CRCs, but torch does not check them.) A checkpoint without the
record (saved by hand, or by an older version of this project) is loaded as it is.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import zipfile
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.train.models import build_model, load_reason

CHECKPOINT = "checkpoint.pt"
INTEGRITY = "integrity_sha256"  # the entry that holds `state_digest` of the rest


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` to `path` atomically: a crash mid-save never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    state = {key: _interned(value) for key, value in state.items() if key != INTEGRITY}
    torch.save({**state, INTEGRITY: state_digest(state)}, partial)
    os.replace(partial, path)


def _interned(value):
    """`value` with every string interned. Why: pickle writes a string met twice as the same
    object as a back-reference, so without this the file's bytes (and the sha256 the stores and
    evaluations record) would depend on which equal strings happen to be one object in memory,
    not only on the values: the same run, parsed by other code, saved other bytes."""
    if type(value) is str:
        return sys.intern(value)
    if type(value) is dict:  # plain containers only: a state_dict (OrderedDict) keeps its type
        return {_interned(key): _interned(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_interned(item) for item in value)
    return value


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by `fit`, loaded safely (tensors and plain data only); anything
    else (refused by weights_only, damaged, not this project's) is one line naming it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; train the model first "
                                "(dvc repro)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # A damaged file can fail anywhere inside torch's reader (zip records, pickle opcodes,
    # storage sizes), with any exception type: all mean the same to the user.
    except Exception as error:  # noqa: BLE001
        refused = isinstance(error, pickle.UnpicklingError) and (
            "Unsupported global" in str(error) or not zipfile.is_zipfile(path))
        if refused:  # weights_only refused a global (maybe code), or not torch's zip at all
            raise UserError(f"{path}: not a checkpoint this project wrote, or unsafe to load "
                            f"(torch.load(weights_only=True) refused it: {load_reason(error)}); "
                            "use the checkpoint.pt a training stage wrote") from None
        raise UserError(f"{path}: damaged or not a PyTorch checkpoint ({load_reason(error)}); "
                        "delete it and rerun its training stage (dvc repro)") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path}: not a checkpoint this project wrote (no 'model' entry); "
                        "use the checkpoint.pt a training stage wrote")
    recorded = state.pop(INTEGRITY, None)
    if recorded is not None and recorded != state_digest(state):
        raise UserError(f"{path}: damaged (its contents no longer match the sha256 recorded "
                        "when it was saved); delete it and rerun its training stage (dvc repro)")
    return state


def state_digest(state: dict) -> str:
    """sha256 over a checkpoint's contents in a fixed order: tensors by dtype, shape and bytes,
    plain values by type and repr, mappings by sorted key."""
    digest = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"tensor:{value.dtype}:{tuple(value.shape)}:".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            digest.update(f"dict:{len(value)}:".encode())
            for key in sorted(value, key=repr):
                digest.update(f"{key!r}=".encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__}:{len(value)}:".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"{type(value).__name__}:{value!r};".encode())

    feed(state)
    return digest.hexdigest()


def load_model(checkpoint_path: str | Path) -> tuple[nn.Module, dict]:
    """A trained model (on the CPU, eval mode) and its checkpoint."""
    state = load_checkpoint(checkpoint_path)
    model = build_model(state["arch"], state["num_classes"], small_input=state["small_input"])
    model.load_state_dict(state["model"])
    return model.eval(), state
