"""Distillation losses: CE, KL-KD and IKL-KD (Decoupled / Improved KL), usable as plain PyTorch.

Every loss is a pure function of logits with keyword options; thin `nn.Module` wrappers hold the
options, and `distillation_objective(name, **options)` builds the one callable the trainer uses:

    objective = distillation_objective("ikl", alpha=4.0, beta=4.0)
    terms = objective(student_logits, labels, teacher_logits, class_weights)  # dict of scalars
    terms["loss"].backward()

Notation: s = student logits, t = teacher logits, both (B, C); T = `temperature`,
T2 = `weight_temperature`.

- KL-KD:  T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over the batch.
- IKL-KD: alpha * (soft-label CE at T, scaled by T^2 like KL-KD) + beta * wMSE, with
  wMSE = 1/4 * sum_{j,k} w_j w_k ((t_j - t_k) - (s_j - s_k))^2 per sample, mean over the batch,
  w = softmax(t / T2) ** gamma (sample-wise), or a caller-given (B, C) row of the teacher's
  class prior for each sample's label (GI: "global information") ** gamma.
  `normalize=True` divides each sample's double sum by sum_{j,k} w_j w_k (generalised variant).

Value convention: soft-label CE = KL(p_t || p_s) + H(p_t), and the teacher entropy H(p_t) has no
gradient wrt the student. We return the KL part as the value (zero when the student matches the
teacher, and equal to KL-KD's value up to rounding, so `alpha=1, beta=0` IKL logs like KL-KD);
the gradient is the soft-label CE gradient either way. IKL computes that KL value without a
log-softmax pass (see `_ikl_value_and_gradient`), so in float32 it carries an absolute error of
about 1e-7 * |t - s| (it can read -1e-6 for a student equal to the teacher plus a constant);
the gradient is exact to float32 rounding.

Paper presets (ImageNet-LT). Shared by all rows: SGD lr 0.05 at batch 128, momentum 0.9,
weight decay 5e-4, 90 epochs, 10 warmup epochs then cosine, RandomResizedCrop 224 + flip,
T = 1, CE on the label with weight 1. Runnable as params: pipeline/presets (one source of truth).

    teacher -> student          loss  options
    ResNeXt101-32x4d -> ResNet18  kl    weight 4
    ResNeXt101-32x4d -> ResNet50  kl    weight 3
    ResNet50 -> ResNet50          kl    weight 1
    ResNeXt101-32x4d -> ResNet18  ikl   alpha 4, beta 4    (sample-wise w, T2 = 100)
    ResNeXt101-32x4d -> ResNet50  ikl   alpha 3, beta 4    (sample-wise w, T2 = 100)
    ResNet50 -> ResNet50          ikl   alpha 1, beta 1    (sample-wise w, T2 = 100)
    ResNet18 -> ResNet18          ikl   alpha 1, beta 0.5  (sample-wise w, T2 = 100)
    ResNeXt101-32x4d -> ResNet18  ikl   alpha 4, beta 4    (GI class prior, T2 = 1, gamma 0.3,
    ResNeXt101-32x4d -> ResNet50  ikl   alpha 3, beta 4     normalize)
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "kl_kd_loss",
    "ikl_weights",
    "ikl_kd_terms",
    "ikl_kd_loss",
    "KLDivergenceKD",
    "IKLDivergenceKD",
    "DistillationObjective",
    "OBJECTIVES",
    "distillation_objective",
    "ClassPriorAccumulator",
    "class_prior",
    "expand_topk",
    "MIN_RESIDUAL_MASS",
]

def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The widest dtype among `tensors`, at least float32: float16/bfloat16 are computed in
    float32 (softmax and squared logit gaps overflow or lose all precision in half), float64
    stays float64."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


# ---------------------------------------------------------------------------------------------
# Pure losses
# ---------------------------------------------------------------------------------------------


def kl_kd_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over the batch.

    student_logits: (B, C); teacher_logits: (B, C), detached here. Half inputs are computed in
    float32. Returns a scalar of the compute dtype. The T^2 factor keeps the gradient's scale
    independent of T (Hinton et al.), as in mdistiller.
    """
    dtype = _compute_dtype(student_logits, teacher_logits)
    student_logits, teacher_logits = student_logits.to(dtype), teacher_logits.detach().to(dtype)
    if temperature != 1.0:  # division by 1 is exact: skip the passes (the paper's T is 1)
        student_logits, teacher_logits = student_logits / temperature, teacher_logits / temperature
    student_log_probs = F.log_softmax(student_logits, dim=1)  # (B, C)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=1)  # (B, C)
    # log_target: exp(log p_t) * (log p_t - log p_s) stays 0 (not NaN) where p_t underflows.
    per_class = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    return per_class.sum(dim=1).mean() * temperature**2


def ikl_weights(
    teacher_logits: Tensor,
    *,
    weight_temperature: float = 100.0,
    class_weights: Tensor | None = None,
    gamma: float = 1.0,
) -> Tensor:
    """IKL's pair weights w (B, C), without gradient, in the compute dtype.

    Sample-wise: softmax(teacher_logits / weight_temperature) per row. GI: `class_weights` (B, C)
    given by the caller (the class-prior row of each sample's label); teacher_logits then only
    fixes shape, device and dtype. Either is raised to `gamma` (gamma < 1 flattens the weights).
    """
    dtype = _compute_dtype(teacher_logits, *([] if class_weights is None else [class_weights]))
    with torch.no_grad():
        if class_weights is None:
            weights = F.softmax(teacher_logits.to(dtype) / weight_temperature, dim=1)  # (B, C)
        else:
            if class_weights.shape != teacher_logits.shape:
                raise ValueError(
                    f"class_weights has shape {tuple(class_weights.shape)}, expected "
                    f"{tuple(teacher_logits.shape)} (one class-prior row per sample)"
                )
            weights = class_weights.to(device=teacher_logits.device, dtype=dtype)
        if gamma != 1.0:
            weights = weights.pow(gamma)
    return weights


def _logsumexp_from_softmax(logits: Tensor, probs: Tensor) -> Tensor:
    """logsumexp of each row (B,) from its softmax (B, C) without another exp pass:
    lse = x_j - log p_j for any j; at j = argmax, p_j = max(p) >= 1/C (softmax is monotone), so
    the log is well conditioned. Two max reductions: cheaper than an argmax and a gather."""
    return logits.amax(dim=1) - probs.amax(dim=1).log()


def _ikl_value_and_gradient(
    student_logits: Tensor,
    teacher_logits: Tensor,
    weights: Tensor,
    *,
    alpha: float,
    beta: float,
    temperature: float,
    normalize: bool,
    need_gradient: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """IKL's two terms and the gradient of alpha * kl + beta * wmse wrt the student, by hand.

    No autograd: inputs are plain (B, C) tensors of one float dtype (float32 or float64).
    Returns kl (), wmse (), gradient (B, C) or None. With d = t - s:

    kl   = T^2 * mean_b sum_j p_t,j (log p_t,j - log p_s,j), p = softmax(logits / T). Since
           log p_t,j - log p_s,j = d_j / T - (lse_t - lse_s) and sum_j p_t,j = 1, each sample's
           KL is sum_j p_t,j d_j / T - (lse_t - lse_s): no log-softmax pass is needed.
           d kl / d s = T * (p_s - p_t) / B.
    wmse = mean_b 1/4 sum_{j,k} w_j w_k (d_j - d_k)^2, through the closed form
           2 * S * sum_j w_j (d_j - dbar)^2, S = sum_j w_j, dbar = sum_j w_j d_j / S. Per sample
           wmse = scale/2 * sum_j w_j c_j^2 with c = d - dbar and scale = S (or 1/S when
           normalised by sum_{j,k} w_j w_k = S^2); since sum_j w_j c_j = 0 the dbar term drops
           out of the derivative: d wmse / d s_j = -scale * w_j c_j / B.
    Centring d before squaring keeps large logits exact (no cancellation of huge squares).
    Buffers are reused in place once spent: each fresh (B, C) allocation costs about as much as
    the arithmetic on it.
    """
    batch = student_logits.shape[0]
    # Division by T = 1 is exact: skip the passes (the paper's T is 1), as in kl_kd_loss.
    scaled_student = student_logits if temperature == 1.0 else student_logits / temperature
    scaled_teacher = teacher_logits if temperature == 1.0 else teacher_logits / temperature
    student_probs = F.softmax(scaled_student, dim=1)  # (B, C)
    teacher_probs = F.softmax(scaled_teacher, dim=1)  # (B, C); 0 where it underflows
    lse_gap = _logsumexp_from_softmax(scaled_teacher, teacher_probs) - _logsumexp_from_softmax(
        scaled_student, student_probs
    )  # (B,) lse_t - lse_s
    gaps = teacher_logits - student_logits  # (B, C) d
    # sum over batch and classes of p_t * d / T in one BLAS dot, then the batch mean and T^2.
    cross = torch.dot(teacher_probs.reshape(-1), gaps.reshape(-1)) / temperature
    kl = (cross - lse_gap.sum()).mul_(temperature**2 / batch)

    # S; an all-zero weight row has a zero double sum, and the clamp only avoids 0/0 there.
    weight_sum = weights.sum(dim=1, keepdim=True).clamp_min_(torch.finfo(weights.dtype).tiny)
    weighted_gaps = weights * gaps  # (B, C) w * d
    mean_gap = weighted_gaps.sum(dim=1, keepdim=True) / weight_sum  # (B, 1) dbar
    centred_gaps = gaps.sub_(mean_gap)  # (B, C) c = d - dbar
    torch.mul(weights, centred_gaps, out=weighted_gaps)  # (B, C) w * c, into the spent buffer
    spread = centred_gaps.mul_(weighted_gaps).sum(dim=1)  # (B,) sum_j w_j c_j^2
    scale = (1.0 / weight_sum if normalize else weight_sum).squeeze(1)  # (B,)
    wmse = torch.dot(scale, spread).mul_(0.5 / batch)  # mean over the batch of scale/2 * spread

    if not need_gradient:
        return kl, wmse, None
    gradient = student_probs.sub_(teacher_probs)  # (B, C) p_s - p_t
    gradient.mul_(alpha * temperature / batch)
    gradient.addcmul_(weighted_gaps, scale.unsqueeze(1), value=-beta / batch)
    return kl, wmse, gradient


class _IKLFunction(torch.autograd.Function):
    """IKL-KD with its analytic gradient, computed in the forward pass into one (B, C) buffer.

    Why not autograd: through the closed form it records ~25 small kernels and took 3.1x
    KL-KD's time at B = 128, C = 1000 on CPU; this form takes about 1.3x (benchmarks/losses.py).
    Returns (total, kl, wmse); only total is differentiable, and only wrt the student. Not
    twice differentiable (nothing in distillation needs it)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, weights, alpha, beta, temperature, normalize):
        dtype = _compute_dtype(student_logits, teacher_logits)
        ctx.student_dtype = student_logits.dtype
        kl, wmse, gradient = _ikl_value_and_gradient(
            student_logits.to(dtype),
            teacher_logits.to(dtype),
            weights.to(dtype),
            alpha=alpha,
            beta=beta,
            temperature=temperature,
            normalize=normalize,
            need_gradient=ctx.needs_input_grad[0],
        )
        ctx.save_for_backward(gradient)
        ctx.mark_non_differentiable(kl, wmse)
        return torch.add(kl * alpha, wmse, alpha=beta), kl, wmse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_kl, _grad_wmse):
        (gradient,) = ctx.saved_tensors
        grad_student = (gradient * grad_total).to(ctx.student_dtype)
        return grad_student, None, None, None, None, None, None


def ikl_kd_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float,
    beta: float,
    temperature: float = 1.0,
    weight_temperature: float = 100.0,
    class_weights: Tensor | None = None,
    gamma: float = 1.0,
    normalize: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(total, kl, wmse): `ikl_kd_loss` and its two unweighted terms, detached, for logging.

    kl is the KL part at `temperature` (T^2-scaled soft-label CE minus teacher entropy), wmse
    the weighted logit MSE. Arguments as in `ikl_kd_loss`.
    """
    weights = ikl_weights(
        teacher_logits,
        weight_temperature=weight_temperature,
        class_weights=class_weights,
        gamma=gamma,
    )
    return _IKLFunction.apply(
        student_logits, teacher_logits.detach(), weights, alpha, beta, temperature, normalize
    )


def ikl_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float,
    beta: float,
    temperature: float = 1.0,
    weight_temperature: float = 100.0,
    class_weights: Tensor | None = None,
    gamma: float = 1.0,
    normalize: bool = False,
) -> Tensor:
    """IKL-KD = alpha * T^2 * soft-label CE at T (valued as KL) + beta * wMSE, a scalar.

    student_logits, teacher_logits: (B, C); class_weights: (B, C) or None (then sample-wise
    w = softmax(t / weight_temperature)). w is raised to `gamma`; `normalize` divides each
    sample's double sum by sum_{j,k} w_j w_k. wMSE uses the exact O(C) closed form (see
    `_ikl_value_and_gradient`), never a (C, C) matrix. The teacher and w carry no gradient.
    Half inputs are computed in float32; the value is float32 (float64 for float64 inputs).
    """
    total, _, _ = ikl_kd_terms(
        student_logits,
        teacher_logits,
        alpha=alpha,
        beta=beta,
        temperature=temperature,
        weight_temperature=weight_temperature,
        class_weights=class_weights,
        gamma=gamma,
        normalize=normalize,
    )
    return total


# ---------------------------------------------------------------------------------------------
# Modules and the training objective
# ---------------------------------------------------------------------------------------------


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"loss option {name} must be > 0, got {value!r}")


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if not value >= 0:
            raise ValueError(f"loss option {name} must be >= 0, got {value!r}")


class KLDivergenceKD(nn.Module):
    """`kl_kd_loss` as a module: forward(student_logits (B, C), teacher_logits (B, C)) -> ()."""

    def __init__(self, *, temperature: float = 1.0):
        super().__init__()
        _check_positive(temperature=temperature)
        self.temperature = temperature

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return kl_kd_loss(student_logits, teacher_logits, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class IKLDivergenceKD(nn.Module):
    """`ikl_kd_loss` as a module: forward(student_logits (B, C), teacher_logits (B, C),
    class_weights (B, C) or None) -> scalar. `terms(...)` also returns the unweighted (kl, wmse)."""

    def __init__(
        self,
        *,
        alpha: float,
        beta: float,
        temperature: float = 1.0,
        weight_temperature: float = 100.0,
        gamma: float = 1.0,
        normalize: bool = False,
    ):
        super().__init__()
        _check_positive(temperature=temperature, weight_temperature=weight_temperature)
        _check_non_negative(alpha=alpha, beta=beta, gamma=gamma)
        self.alpha, self.beta = alpha, beta
        self.temperature, self.weight_temperature = temperature, weight_temperature
        self.gamma, self.normalize = gamma, normalize

    def terms(
        self, student_logits: Tensor, teacher_logits: Tensor, class_weights: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(total, kl, wmse) as in `ikl_kd_terms`: total differentiable, the terms detached."""
        return ikl_kd_terms(
            student_logits,
            teacher_logits,
            alpha=self.alpha,
            beta=self.beta,
            temperature=self.temperature,
            weight_temperature=self.weight_temperature,
            class_weights=class_weights,
            gamma=self.gamma,
            normalize=self.normalize,
        )

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, class_weights: Tensor | None = None
    ) -> Tensor:
        total, _, _ = self.terms(student_logits, teacher_logits, class_weights)
        return total

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, "
            f"weight_temperature={self.weight_temperature}, gamma={self.gamma}, "
            f"normalize={self.normalize}"
        )


class DistillationObjective(nn.Module):
    """The trainer's one loss: total = ce_weight * CE(student, label) + the KD term.

    forward(student_logits (B, C), labels (B,), teacher_logits (B, C) or None,
    class_weights (B, C) or None) -> {"loss": total (with gradient), "ce": ..., and per KD kind
    "kd" (kl) or "kd_kl", "kd_wmse", "kd" (ikl)}; every entry but "loss" is detached, for logs.
    `needs_teacher` / `needs_class_prior` tell the trainer what to fetch.
    """

    def __init__(
        self,
        kd_loss: KLDivergenceKD | IKLDivergenceKD | None,
        *,
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        use_class_prior: bool = False,
    ):
        super().__init__()
        _check_non_negative(ce_weight=ce_weight, kd_weight=kd_weight)
        if use_class_prior and not isinstance(kd_loss, IKLDivergenceKD):
            raise ValueError("use_class_prior only applies to the ikl loss")
        self.kd_loss = kd_loss
        self.ce_weight, self.kd_weight = ce_weight, kd_weight
        self.needs_teacher = kd_loss is not None
        self.needs_class_prior = use_class_prior

    def forward(
        self,
        student_logits: Tensor,
        labels: Tensor,
        teacher_logits: Tensor | None = None,
        class_weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        dtype = _compute_dtype(student_logits)
        ce = F.cross_entropy(student_logits.to(dtype), labels.long())
        terms = {"ce": ce}
        total = self.ce_weight * ce
        if self.kd_loss is not None:
            if teacher_logits is None:
                raise ValueError("this objective distils: pass teacher_logits (B, C)")
            if self.needs_class_prior and class_weights is None:
                raise ValueError("use_class_prior is set: pass class_weights (B, C)")
            if not self.needs_class_prior and class_weights is not None:
                raise ValueError("class_weights given but use_class_prior is not set")
            if isinstance(self.kd_loss, IKLDivergenceKD):
                kd, kl, wmse = self.kd_loss.terms(student_logits, teacher_logits, class_weights)
                terms.update(kd_kl=kl, kd_wmse=wmse)
            else:
                kd = self.kd_loss(student_logits, teacher_logits)
            terms["kd"] = kd
            total = total + self.kd_weight * kd
        logged = {name: value.detach() for name, value in terms.items()}
        return {"loss": total, **logged}


def _ce_objective(*, ce_weight: float = 1.0) -> DistillationObjective:
    """Plain cross-entropy on the label; no teacher."""
    return DistillationObjective(None, ce_weight=ce_weight)


def _kl_objective(
    *, weight: float = 1.0, temperature: float = 1.0, ce_weight: float = 1.0
) -> DistillationObjective:
    """ce_weight * CE + weight * KL-KD at `temperature`."""
    return DistillationObjective(
        KLDivergenceKD(temperature=temperature), ce_weight=ce_weight, kd_weight=weight
    )


def _ikl_objective(
    *,
    alpha: float,
    beta: float,
    temperature: float = 1.0,
    weight_temperature: float = 100.0,
    gamma: float = 1.0,
    normalize: bool = False,
    use_class_prior: bool = False,
    ce_weight: float = 1.0,
) -> DistillationObjective:
    """ce_weight * CE + IKL-KD; `use_class_prior` selects GI weights (trainer passes
    class_weights = prior[labels]) over sample-wise softmax(t / weight_temperature)."""
    kd_loss = IKLDivergenceKD(
        alpha=alpha,
        beta=beta,
        temperature=temperature,
        weight_temperature=weight_temperature,
        gamma=gamma,
        normalize=normalize,
    )
    return DistillationObjective(kd_loss, ce_weight=ce_weight, use_class_prior=use_class_prior)


# Loss name in params -> builder taking that loss's keyword options.
OBJECTIVES: dict[str, Callable[..., DistillationObjective]] = {
    "ce": _ce_objective,
    "kl": _kl_objective,
    "ikl": _ikl_objective,
}


def distillation_objective(name: str, **options) -> DistillationObjective:
    """Build the training objective registered as `name` ("ce", "kl", "ikl") with `options`.

    Unknown names, unknown or missing options raise ValueError naming what is accepted.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(OBJECTIVES))}")
    builder = OBJECTIVES[name]
    signature = inspect.signature(builder)
    try:
        signature.bind(**options)
    except TypeError as error:
        accepted = ", ".join(signature.parameters)
        raise ValueError(f"bad options for loss {name!r} ({error}); accepted: {accepted}") from None
    return builder(**options)


# ---------------------------------------------------------------------------------------------
# Class prior (IKL's global information)
# ---------------------------------------------------------------------------------------------


class ClassPriorAccumulator:
    """Accumulates the class-wise mean of softmax(teacher_logits / weight_temperature).

    `sums` (C, C) float64: row c sums the teacher's predictions over samples labelled c;
    `counts` (C,) int64: samples per class. Both are plain tensors so a distributed caller can
    all-reduce them (SUM) before `compute()`. float64 keeps millions of additions exact enough.
    """

    def __init__(
        self, num_classes: int, *, weight_temperature: float, device: torch.device | str = "cpu"
    ):
        _check_positive(weight_temperature=weight_temperature)
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


# ---------------------------------------------------------------------------------------------
# Top-k teacher logits from the store
# ---------------------------------------------------------------------------------------------

# Floor on the residual probability mass outside the top-k. Stored top-k logits are float16, so
# 1 - sum(top-k probs) is noisy and can come out <= 0 for a confident teacher; the floor keeps
# the filled logits finite (lse + log(1e-12 / (C - k)) is about lse - 27.6 - log(C - k), far
# below any top-k logit) so neither -inf nor NaN reaches the losses. 1e-12 is far below float32's
# resolution of 1, so the floor never changes a residual that is actually measurable.
MIN_RESIDUAL_MASS = 1e-12


def expand_topk(
    topk_logits: Tensor, topk_classes: Tensor, logsumexp: Tensor, num_classes: int
) -> Tensor:
    """Full (B, C) float32 teacher logits from the store's top-k.

    topk_logits (B, k) float16/float32, topk_classes (B, k) any integer dtype, logsumexp (B,)
    float32 (over all C original logits). Classes outside the top-k share the residual mass
    evenly: logit = lse + log(residual / (C - k)), residual = 1 - sum_j exp(topk_j - lse),
    clamped to [MIN_RESIDUAL_MASS, (C - k) * smallest top-k prob] (no tail class can be more
    likely than a top-k class). Top-k probabilities are exact whenever the residual is not
    clamped; with k == C the logits are returned as stored (exact).
    """
    batch, k = topk_logits.shape
    if topk_classes.shape != topk_logits.shape or logsumexp.shape != (batch,):
        raise ValueError(
            f"top-k shapes disagree: logits {tuple(topk_logits.shape)}, classes "
            f"{tuple(topk_classes.shape)}, logsumexp {tuple(logsumexp.shape)}"
        )
    if not 1 <= k <= num_classes:
        raise ValueError(f"top-k width {k} must be between 1 and num_classes={num_classes}")
    topk_logits = topk_logits.to(torch.float32)  # (B, k)
    class_index = topk_classes.to(torch.int64)  # scatter needs int64; store has uint8..int32
    full = topk_logits.new_empty(batch, num_classes)  # (B, C)
    if k < num_classes:
        tail_count = num_classes - k
        lse = logsumexp.to(torch.float32).unsqueeze(1)  # (B, 1)
        topk_log_probs = topk_logits - lse  # (B, k)
        residual = 1.0 - topk_log_probs.exp().sum(dim=1, keepdim=True)  # (B, 1)
        smallest_prob = topk_log_probs.min(dim=1, keepdim=True).values.exp()  # (B, 1)
        residual = torch.minimum(residual, tail_count * smallest_prob)
        residual = residual.clamp_min(MIN_RESIDUAL_MASS)
        full.copy_((lse + torch.log(residual / tail_count)).expand(batch, num_classes))
    full.scatter_(1, class_index, topk_logits)
    return full
