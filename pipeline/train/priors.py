"""IKL's global information (GI): the teacher's class-wise mean prediction, used as the wMSE
weights of every sample of a class (`student.ikl.weights: class_prior`).

Two sources: the store's exact prior, accumulated at dump time over every cached view
(`ClassPriorAccumulator`, pipeline/store/dump.py), and the official `--GI`, the prior of the
previous epoch's crops (`PreviousEpochPrior`, the training loop).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ClassPriorAccumulator", "PreviousEpochPrior", "class_prior"]


class ClassPriorAccumulator:
    """Accumulates the class-wise mean of softmax(teacher_logits / weight_temperature).

    `sums` (C, C) float64: row c sums the teacher's predictions over samples labelled c;
    `counts` (C,) int64: samples per class. Both are plain tensors so a distributed caller can
    all-reduce them (SUM) before `compute()`. float64 keeps millions of additions exact enough.
    """

    def __init__(
        self, num_classes: int, *, weight_temperature: float, device: torch.device | str = "cpu"
    ):
        if not weight_temperature > 0:
            raise ValueError(f"weight_temperature must be > 0, got {weight_temperature!r}")
        self.num_classes = num_classes
        self.weight_temperature = weight_temperature
        self.sums = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor, labels: Tensor) -> None:
        """Add a batch: teacher_logits (B, C), labels (B,) any integer dtype."""
        if teacher_logits.shape[1] != self.num_classes:
            raise ValueError(
                f"teacher_logits has {teacher_logits.shape[1]} classes, "
                f"the accumulator {self.num_classes}"
            )
        device = self.sums.device
        probs = F.softmax(teacher_logits.to(device, torch.float64) / self.weight_temperature, dim=1)
        labels = labels.to(device, torch.int64)  # (B,)
        self.sums.index_add_(0, labels, probs)
        self.counts += torch.bincount(labels, minlength=self.num_classes)

    def compute(self) -> Tensor:
        """(C, C) float32 prior, rows summing to 1; a class with no samples gets the uniform
        row 1/C (nothing is known about it, and uniform weights keep wMSE well defined)."""
        rows = self.sums / self.counts.clamp_min(1).unsqueeze(1).to(self.sums.dtype)  # (C, C)
        uniform = torch.full_like(rows, 1.0 / self.num_classes)
        rows = torch.where((self.counts > 0).unsqueeze(1), rows, uniform)
        # Each mean of probability rows already sums to 1 up to rounding; make it exact.
        return (rows / rows.sum(dim=1, keepdim=True)).to(torch.float32)


class PreviousEpochPrior:
    """GI weights as the official `--GI` computes them: epoch e uses the class prior of the
    teacher's outputs on the crops of epoch e - 1, epoch 0 a uniform 1/C matrix.

    Official (imagenetlt_distill_dkl.py, `train`): `prior = CLASS_PRIORS if not None else
    ones(C, C) / C`; per batch `PRIOR += concat_all_gather(onehot).t() @
    softmax(concat_all_gather(logits_k) / T2)` and `CLASS_PRIOR = onehot @ prior`; after the
    epoch `PRIOR / PRIOR.sum(1, keepdim=True)` becomes the next epoch's prior. Row c of that is
    the mean of softmax(t / T2) over the epoch's crops labelled c on all ranks (each softmax row
    sums to 1); a class without crops gets 1/C here (official: 0/0).

    It only receives teacher logits, whatever produced them (a store or a live teacher):
    `weights(labels)` before the loss, `observe(teacher_logits, labels)` after the targets are
    computed, `end_epoch(all_reduce_)` once every rank has finished the epoch.
    """

    def __init__(
        self, num_classes: int, *, weight_temperature: float, device: torch.device | str = "cpu"
    ):
        self.accumulator = ClassPriorAccumulator(
            num_classes, weight_temperature=weight_temperature, device=device
        )
        self.prior = torch.full(  # (C, C) used this epoch
            (num_classes, num_classes), 1.0 / num_classes, dtype=torch.float32, device=device
        )

    def weights(self, labels: Tensor) -> Tensor:
        """(B, C): this epoch's prior row of each label (B,)."""
        return self.prior[labels.to(self.prior.device, torch.int64)]

    def observe(self, teacher_logits: Tensor, labels: Tensor) -> None:
        """Add a batch's teacher logits (B, C) and labels (B,) to the next epoch's prior."""
        self.accumulator.update(teacher_logits, labels)

    def end_epoch(self, all_reduce_: Callable[[Tensor], Tensor] = lambda tensor: tensor) -> None:
        """Sum the epoch's partial sums over ranks (`all_reduce_` sums a tensor in place, as
        torch.distributed.all_reduce), make them the prior of the next epoch and start again."""
        all_reduce_(self.accumulator.sums)
        all_reduce_(self.accumulator.counts)
        self.prior = self.accumulator.compute().to(self.prior.device)
        self.accumulator.sums.zero_()
        self.accumulator.counts.zero_()

    def state_dict(self) -> dict:
        """The prior the next epoch uses (a resumed run continues with it)."""
        return {"prior": self.prior.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.prior = state["prior"].to(self.prior.device)


def class_prior(
    teacher_logits: Tensor, labels: Tensor, num_classes: int, *, weight_temperature: float
) -> Tensor:
    """One-shot class prior: (C, C), row c = mean softmax(t / weight_temperature) over samples
    labelled c, row-normalised; empty classes get a uniform row. teacher_logits (N, C),
    labels (N,). See `ClassPriorAccumulator` to accumulate over batches or ranks."""
    accumulator = ClassPriorAccumulator(
        num_classes, weight_temperature=weight_temperature, device=teacher_logits.device
    )
    accumulator.update(teacher_logits, labels)
    return accumulator.compute()
