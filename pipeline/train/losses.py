"""Distillation losses: CE, KL-KD and IKL-KD (Decoupled / Improved KL), usable as plain PyTorch.

Every loss is a pure function of logits with keyword options; thin `nn.Module` wrappers hold the
options, and `distillation_objective(name, **options)` builds the one callable the trainer uses:

    objective = distillation_objective("ikl", alpha=4.0, beta=4.0)
    terms = objective(student_logits, labels, teacher_logits, class_weights)  # dict of scalars
    terms["loss"].backward()

Notation: s = student logits, t = teacher logits, both (B, C); T = `temperature`,
T2 = `weight_temperature`.

The reference for every convention is the official code, github.com/jiequancui/DKL (commit
c5e8ad2), `DKLv1/Imbalanced_KD-dkl/imagenetlt_distill_dkl.py` (IKL) and
`DKLv2/Imbalanced_KD-dkl/imagenetlt_distill_dkl.py` (GKL, the generalised variant):

    def kd_loss(logits_student, logits_teacher, temperature):
        log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
        pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
        loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
        loss_kd *= temperature**2

    def dkl_loss(...):                                    # V1; V2 differs where marked
        delta_n = (logits_teacher.view(-1, C, 1) - logits_teacher.view(-1, 1, C))
        delta_a = (logits_student.view(-1, C, 1) - logits_student.view(-1, 1, C))
        if GI: p_n = CLASS_PRIOR (** gamma, V2) outer CLASS_PRIOR
        else:  s_n = F.softmax(logits_teacher / T2, dim=1) (** gamma, V2); p_n = s_n outer s_n
        loss_mse = 0.25 * (torch.pow(delta_n - delta_a, 2) * p_n).sum() / logits_student.size(0)
                                                     # V2: ... .sum() / p_n.sum()
        loss_sce = -(F.softmax(logits_teacher / temperature, dim=-1).detach()
                     * F.log_softmax(logits_student / temperature, dim=-1)).sum(1).mean()
        return beta * loss_mse + alpha * loss_sce

- KL-KD:  T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over the batch.
- IKL-KD: alpha * soft_CE + beta * wMSE. soft_CE = -sum_j softmax(t/T)_j log softmax(s/T)_j,
  teacher detached, mean over the batch, with NO T^2 factor (unlike KL-KD: at T != 1 the
  gradient of the soft term is 1/T^2 of KL-KD's). wMSE = 1/4 * sum_b sum_{j,k} w_j w_k
  ((t_j - t_k) - (s_j - s_k))^2 / B, w = softmax(t / T2) ** gamma (sample-wise), or a
  caller-given (B, C) row of the teacher's class prior for each sample's label (GI: "global
  information") ** gamma. `normalize=True` (GKL) divides the batch's double sum by the batch
  total sum_b sum_{j,k} w_j w_k = sum_b S_b^2 (S = sum_j w_j), one normaliser for the whole
  batch, instead of by B.

Value convention: the value is the official one, alpha * soft_CE + beta * wMSE (what the
official script logs, less its CE). soft_CE = KL(p_t || p_s) + H(p_t); `ikl_kd_terms` also
returns the KL part (zero when the student matches the teacher) for curves that should reach
zero. IKL computes its values without a log-softmax pass (see `_ikl_value_and_gradient`), so in
float32 they carry an absolute error of about 1e-7 * max|s| / T; the gradient is exact to
float32 rounding.

Paper presets (ImageNet-LT, `sh/Distill/*.sh` of both versions). Shared by all rows: SGD lr 0.05
at a global batch of 128 (4 GPUs x 32), momentum 0.9, weight decay 5e-4, 90 epochs, 10 warm-up
epochs then cosine per epoch, RandomResizedCrop 224 + flip, T = 1, CE on the label with weight
1, fp32. Runnable as params: pipeline/tools/presets (one source of truth).

    teacher -> student          loss  options
    ResNeXt101-32x4d -> ResNet18  kl    weight 4
    ResNeXt101-32x4d -> ResNet50  kl    weight 3
    ResNet50 -> ResNet50          kl    weight 1
    ResNet18 -> ResNet18          kl    weight 4
    ResNeXt101-32x4d -> ResNet18  ikl   alpha 4, beta 4    (sample-wise w, T2 = 100)
    ResNeXt101-32x4d -> ResNet50  ikl   alpha 3, beta 4    (sample-wise w, T2 = 100)
    ResNet50 -> ResNet50          ikl   alpha 1, beta 1    (sample-wise w, T2 = 100)
    ResNet18 -> ResNet18          ikl   alpha 1, beta 0.5  (sample-wise w, T2 = 100)
    ResNeXt101-32x4d -> ResNet18  gkl   alpha 4, beta 4    (GI prior of the previous epoch,
    ResNeXt101-32x4d -> ResNet50  gkl   alpha 3, beta 4     T2 = 1, gamma 0.3, normalised
    ResNet50 -> ResNet50          gkl   alpha 1, beta 1     by the batch total)
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "kl_kd_loss",
    "ikl_weights",
    "ikl_kd_terms",
    "IKLTerms",
    "ikl_kd_loss",
    "KLDivergenceKD",
    "IKLDivergenceKD",
    "DistillationObjective",
    "OBJECTIVES",
    "distillation_objective",
    "ClassPriorAccumulator",
    "PreviousEpochPrior",
    "class_prior",
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
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """IKL's terms and the gradient of alpha * soft_ce + beta * wmse wrt the student, by hand.

    No autograd: inputs are plain (B, C) tensors of one float dtype (float32 or float64).
    Returns soft_ce (), kl (), wmse (), gradient (B, C) or None. With d = t - s and
    p = softmax(logits / T), lse = logsumexp(logits / T):

    soft_ce = mean_b -sum_j p_t,j log p_s,j = mean_b (lse_s - sum_j p_t,j s_j / T), no T^2
           (the official `loss_sce`). d soft_ce / d s = (p_s - p_t) / (T B).
    kl   = mean_b sum_j p_t,j (log p_t,j - log p_s,j) = mean_b (sum_j p_t,j d_j / T
           - (lse_t - lse_s)): soft_ce minus the teacher's entropy, for logs only.
    wmse = 1/4 sum_b sum_{j,k} w_j w_k (d_j - d_k)^2 / N, N = B, or N = sum_b S_b^2 when
           `normalize` (the batch total of sum_{j,k} w_j w_k, official GKL), through the
           closed form 1/4 sum_{j,k} w_j w_k (d_j - d_k)^2 = S/2 * sum_j w_j c_j^2,
           S = sum_j w_j, c = d - dbar, dbar = sum_j w_j d_j / S. Since sum_j w_j c_j = 0
           the dbar term drops out of the derivative: d wmse / d s_j = -S w_j c_j / N.
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
    student_lse = _logsumexp_from_softmax(scaled_student, student_probs)  # (B,)
    lse_gap = _logsumexp_from_softmax(scaled_teacher, teacher_probs) - student_lse  # (B,)
    # Sums over batch and classes of p_t * s / T and p_t * d / T, each one BLAS dot.
    flat_teacher_probs = teacher_probs.reshape(-1)
    student_cross = torch.dot(flat_teacher_probs, student_logits.reshape(-1)) / temperature
    soft_ce = (student_lse.sum() - student_cross) / batch
    gaps = teacher_logits - student_logits  # (B, C) d
    cross = torch.dot(flat_teacher_probs, gaps.reshape(-1)) / temperature
    kl = (cross - lse_gap.sum()) / batch

    # S; an all-zero weight row has a zero double sum, and the clamp only avoids 0/0 there.
    tiny = torch.finfo(weights.dtype).tiny
    weight_sum = weights.sum(dim=1, keepdim=True).clamp_min_(tiny)  # (B, 1) S
    weighted_gaps = weights * gaps  # (B, C) w * d
    mean_gap = weighted_gaps.sum(dim=1, keepdim=True) / weight_sum  # (B, 1) dbar
    centred_gaps = gaps.sub_(mean_gap)  # (B, C) c = d - dbar
    torch.mul(weights, centred_gaps, out=weighted_gaps)  # (B, C) w * c, into the spent buffer
    spread = centred_gaps.mul_(weighted_gaps).sum(dim=1)  # (B,) sum_j w_j c_j^2
    scale = weight_sum.squeeze(1)  # (B,) S
    # N: the batch size, or (GKL) the batch total of sum_{j,k} w_j w_k = sum_b S_b^2.
    normaliser = scale.square().sum().clamp_min(tiny) if normalize else batch
    wmse = torch.dot(scale, spread) * (0.5 / normaliser)

    if not need_gradient:
        return soft_ce, kl, wmse, None
    gradient = student_probs.sub_(teacher_probs)  # (B, C) p_s - p_t
    gradient.mul_(alpha / (temperature * batch))
    gradient.addcmul_(weighted_gaps, (scale * (-beta / normaliser)).unsqueeze(1))
    return soft_ce, kl, wmse, gradient


class IKLTerms(NamedTuple):
    """`ikl_kd_terms`' result: total = alpha * soft_ce + beta * wmse (differentiable wrt the
    student); soft_ce, kl (= soft_ce minus the teacher entropy) and wmse detached, unweighted."""

    total: Tensor
    soft_ce: Tensor
    kl: Tensor
    wmse: Tensor


class _IKLFunction(torch.autograd.Function):
    """IKL-KD with its analytic gradient, computed in the forward pass into one (B, C) buffer.

    Why not autograd: through the closed form it records ~25 small kernels and took 3.1x
    KL-KD's time at B = 128, C = 1000 on CPU; this form takes about 1.3x (benchmarks/losses.py).
    Returns (total, soft_ce, kl, wmse); only total is differentiable, and only wrt the student.
    Not twice differentiable (nothing in distillation needs it)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, weights, alpha, beta, temperature, normalize):
        dtype = _compute_dtype(student_logits, teacher_logits)
        ctx.student_dtype = student_logits.dtype
        soft_ce, kl, wmse, gradient = _ikl_value_and_gradient(
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
        ctx.mark_non_differentiable(soft_ce, kl, wmse)
        return torch.add(soft_ce * alpha, wmse, alpha=beta), soft_ce, kl, wmse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_soft_ce, _grad_kl, _grad_wmse):
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
) -> IKLTerms:
    """IKLTerms(total, soft_ce, kl, wmse): `ikl_kd_loss` and its unweighted terms, detached,
    for logging. soft_ce is the official soft-label term at `temperature` (no T^2), kl its KL
    part (soft_ce minus the teacher entropy), wmse the weighted logit MSE. Arguments as in
    `ikl_kd_loss`.
    """
    weights = ikl_weights(
        teacher_logits,
        weight_temperature=weight_temperature,
        class_weights=class_weights,
        gamma=gamma,
    )
    return IKLTerms(*_IKLFunction.apply(
        student_logits, teacher_logits.detach(), weights, alpha, beta, temperature, normalize
    ))


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
    """IKL-KD = alpha * soft-label CE at T (no T^2, as the official code) + beta * wMSE, a scalar.

    student_logits, teacher_logits: (B, C); class_weights: (B, C) or None (then sample-wise
    w = softmax(t / weight_temperature)). w is raised to `gamma`. wMSE's batch double sum is
    divided by B, or with `normalize` (GKL) by its batch total sum_b sum_{j,k} w_j w_k. wMSE uses
    the exact O(C) closed form (see `_ikl_value_and_gradient`), never a (C, C) matrix. The
    teacher and w carry no gradient. Half inputs are computed in float32; the value is float32
    (float64 for float64 inputs).
    """
    return ikl_kd_terms(
        student_logits,
        teacher_logits,
        alpha=alpha,
        beta=beta,
        temperature=temperature,
        weight_temperature=weight_temperature,
        class_weights=class_weights,
        gamma=gamma,
        normalize=normalize,
    ).total


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
    class_weights (B, C) or None) -> scalar. `terms(...)` also returns the unweighted terms."""

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
    ) -> IKLTerms:
        """IKLTerms as in `ikl_kd_terms`: total differentiable, the terms detached."""
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
        return self.terms(student_logits, teacher_logits, class_weights).total

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
    "kd" (kl) or "kd" (alpha * soft_ce + beta * wmse, the official value), "kd_soft_ce",
    "kd_kl" (soft_ce minus the teacher entropy), "kd_wmse" (ikl)}; every entry but "loss" is
    detached, for logs.
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
                kd, soft_ce, kl, wmse = self.kd_loss.terms(student_logits, teacher_logits,
                                                           class_weights)
                terms.update(kd_soft_ce=soft_ce, kd_kl=kl, kd_wmse=wmse)
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
