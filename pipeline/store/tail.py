"""The quantised tail (`logits.tail: quantized`): every class's teacher log-probability, compactly.

Why: IKL's weighted MSE needs every class's own teacher logit, weighted about equally at
T2 = 100, so filling the classes outside the top-k evenly puts its gradient 20-60 % off. To first
order the wMSE gradient's relative error is rms(e - mean e) / rms(d - mean d) (e: per-class
error of the stored teacher logits, d = t - s), so each logit must come back within ~0.02 logit
rms.

How: a teacher's log-probabilities over C classes are far from independent (classes that look
alike move together), so per store a PCA basis is fitted once at dump time, before any shard is
written, on the teacher's log-probabilities of view 0 of the first TAIL_FIT_ROWS train rows
(the rows are shuffled by prepare: a mix of classes). Per view the store keeps

    tail_coefficients (r,) int8    the view's coordinates in the basis, in steps of the
                                   component's scale (6 standard deviations of the fit = 127;
                                   int16 and 32,767 above C = 1000: `coefficient_dtype`)
    tail_residuals    (C,) uint16  what the basis misses, log p - approximation, rounded to
                                   TAIL_STEP = 0.06 logit, zigzag-coded (0, -1, 1, -2, ... ->
                                   0, 1, 2, 3, ...: small magnitudes stay small, no clipping)

and the store keeps `tail_mean` (C,), `tail_basis` (C, r) and `tail_scales` (r,) float32. Every
class then comes back within TAIL_STEP / 2 = 0.03 logit (rms 0.017), the top-k exactly. Bytes:
the residuals' entropy, about log2(4.1 sigma / 0.06) bits a class for a residual spread sigma;
the basis takes sigma from the logits' spread (3 logits for a typical teacher) down to about
one, which saves 2 bits a class. Measured in BENCHMARKS.md (`benchmarks/store_size.py`,
`benchmarks/topk_fidelity.py`). Rejected: one byte per class with a per-view range (simpler,
no basis) measured 957 B per view at C = 1000 (goal <= 850) with 0.03 logit rms error on a
wide-range teacher (the wMSE gradient's error then exceeds 2 % for a student near the teacher).

The approximation is computed by one torch function (`tail_approximation`) in float32 both when
encoding and when decoding, so the bound holds up to float32 rounding (~1e-5) on any device.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TAIL_STEP = 0.06  # logit; residual error <= TAIL_STEP / 2
TAIL_FIT_ROWS = 2048  # rows (view 0) the basis is fitted on
COEFFICIENT_RANGE = 6.0  # standard deviations of a coefficient mapped to code 127


# Above this many classes the tail grows its basis and its coefficients' precision: at
# iNaturalist's C = 8,142, int8 coefficients alone leave every class ~0.07 logit off (their
# steps, 6 standard deviations / 127, summed over the basis), which the residuals then pay for
# in bytes; measured in BENCHMARKS.md section 4. Up to here, the store is as it was measured.
WIDE_TAIL_CLASSES = 1000


def tail_components(num_classes: int) -> int:
    """r, the basis size: C / 6 up to 64 (16 at C = 100, 64 at C = 1000), at least 1; above
    WIDE_TAIL_CLASSES, C / 25 from 64 up to 512 (325 at C = 8,142)."""
    if num_classes > WIDE_TAIL_CLASSES:
        return max(64, min(512, num_classes // 25))
    return max(1, min(64, num_classes // 6))


def coefficient_dtype(num_classes: int) -> np.dtype:
    """The dtype of the basis coefficients: int8 up to WIDE_TAIL_CLASSES, int16 above."""
    return np.dtype(np.int8 if num_classes <= WIDE_TAIL_CLASSES else np.int16)


def coefficient_levels(num_classes: int) -> int:
    """The code of COEFFICIENT_RANGE standard deviations: the dtype's largest value."""
    return int(np.iinfo(coefficient_dtype(num_classes)).max)


@dataclass(frozen=True)
class TailBasis:
    """mean (C,), basis (C, r) with orthonormal columns, scales (r,): float32 tensors."""

    mean: torch.Tensor
    basis: torch.Tensor
    scales: torch.Tensor

    def to(self, device: torch.device | str) -> "TailBasis":
        return TailBasis(self.mean.to(device), self.basis.to(device), self.scales.to(device))

    @classmethod
    def from_arrays(cls, mean, basis, scales) -> "TailBasis":
        return cls(*(torch.as_tensor(np.asarray(a, dtype=np.float32)) for a in
                     (mean, basis, scales)))


def fit_tail_basis(log_probs: np.ndarray, components: int) -> TailBasis:
    """PCA of (m, C) log-probabilities (float64): the mean, the top `components` right singular
    vectors and each coordinate's scale (COEFFICIENT_RANGE standard deviations = the code
    `coefficient_levels(C)`: 127 up to C = 1000).
    Deterministic for the same input on the same machine (LAPACK SVD)."""
    log_probs = np.asarray(log_probs, dtype=np.float64)
    mean = log_probs.mean(axis=0)
    _, _, right = np.linalg.svd(log_probs - mean, full_matrices=False)
    basis = right[:components].T  # (C, r)
    if basis.shape[1] < components:  # fewer samples than components: pad with zero columns
        basis = np.pad(basis, ((0, 0), (0, components - basis.shape[1])))
    spread = ((log_probs - mean) @ basis).std(axis=0)  # (r,)
    levels = coefficient_levels(log_probs.shape[1])
    scales = np.where(spread > 0, COEFFICIENT_RANGE * spread / levels, 1.0)
    return TailBasis.from_arrays(mean, basis, scales)


def tail_approximation(coefficients: torch.Tensor, basis: TailBasis) -> torch.Tensor:
    """(n, C) float32: mean + (coefficients * scales) @ basis^T, coefficients (n, r) integers."""
    return torch.addmm(basis.mean.unsqueeze(0), coefficients.float() * basis.scales,
                       basis.basis.T)


def encode_tail(log_probs: np.ndarray, basis: TailBasis) -> dict[str, np.ndarray]:
    """(n, C) float64 log-probabilities -> tail_coefficients (n, r) `coefficient_dtype(C)`
    and tail_residuals (n, C) uint16 (zigzag), decoded by `tail_log_probs` within
    TAIL_STEP / 2."""
    mean, vectors = basis.mean.double().numpy(), basis.basis.double().numpy()
    coordinates = (log_probs - mean) @ vectors / basis.scales.double().numpy()  # (n, r)
    num_classes = log_probs.shape[1]
    levels = coefficient_levels(num_classes)
    coefficients = np.clip(np.rint(coordinates), -levels, levels).astype(
        coefficient_dtype(num_classes))
    approximation = tail_approximation(torch.from_numpy(coefficients), basis).double().numpy()
    steps = np.rint((log_probs - approximation) / TAIL_STEP)
    steps = np.clip(steps, -32768, 32767).astype(np.int64)  # |residual| < 1966 logits
    zigzag = ((steps << 1) ^ (steps >> 63)).astype(np.uint16)
    return {"tail_coefficients": coefficients, "tail_residuals": zigzag}


def unzigzag(codes: np.ndarray) -> np.ndarray:
    """uint16 zigzag codes -> int16 steps (0, 1, 2, 3, ... -> 0, -1, 1, -2, ...)."""
    codes = codes.astype(np.int32)
    return ((codes >> 1) ^ -(codes & 1)).astype(np.int16)


def tail_log_probs(coefficients: torch.Tensor, residual_steps: torch.Tensor,
                   basis: TailBasis) -> torch.Tensor:
    """(n, C) float32 log-probabilities from tail_coefficients (n, r) and the residuals in
    steps (n, C) int16 (after `unzigzag`)."""
    return tail_approximation(coefficients, basis).add_(residual_steps.float(), alpha=TAIL_STEP)
