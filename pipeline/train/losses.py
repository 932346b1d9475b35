"""Distillation losses: CE, KL-KD and IKL-KD (Decoupled / Improved KL), usable as plain PyTorch.

Each KD method is one pure function of logits with keyword options (`kl_kd_loss`,
`ikl_kd_loss`) and one small module holding its options as the validated params dataclass
(`KLDivergenceKD(KLParams)`, `IKLDivergenceKD(IKLParams)`). The trainer's one loss is
`DistillationObjective(student params)`: CE on the label plus the KD term `student.loss` names.

    objective = DistillationObjective(params.student)
    terms = objective(student_logits, labels, teacher_logits, class_weights)  # dict of scalars
    terms["loss"].backward()

Notation: s = student logits, t = teacher logits, both (B, C); T = `temperature`,
T2 = `weight_temperature`. The class priors (IKL's GI weights) are in pipeline/train/priors.py,
the paper's settings as params in pipeline/tools/presets.

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
  caller-given (B, C) row of the teacher's class prior for each sample's label (GI) ** gamma.
  `normalize` (GKL) divides the batch's double sum by the batch total
  sum_b sum_{j,k} w_j w_k = sum_b S_b^2 (S = sum_j w_j), one normaliser for the whole batch.

The value is the official one, alpha * soft_CE + beta * wMSE (what the official script logs,
less its CE); `IKLDivergenceKD.terms` also returns soft_CE's KL part (soft_CE minus the teacher
entropy, zero when the student matches the teacher) for curves that should reach zero. IKL
computes its values without a log-softmax pass, so in float32 they carry an absolute error of
about 1e-7 * max|s| / T; the gradient is exact to float32 rounding.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from pipeline.params import IKLParams, KLParams, StudentParams, parse

__all__ = ["kl_kd_loss", "ikl_kd_loss", "IKLTerms", "KLDivergenceKD", "IKLDivergenceKD",
           "KD_LOSSES", "DistillationObjective"]


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
    return _IKLFunction.apply(student_logits, teacher_logits, class_weights, alpha, beta,
                              temperature, weight_temperature, gamma, normalize, False)


class IKLTerms(NamedTuple):
    """IKL's total = alpha * soft_ce + beta * wmse (differentiable wrt the student); soft_ce, kl
    (= soft_ce minus the teacher entropy) and wmse detached, unweighted."""

    total: Tensor
    soft_ce: Tensor
    kl: Tensor
    wmse: Tensor


def _ikl_value_and_gradient(
    student_logits: Tensor, teacher_logits: Tensor, weights: Tensor, *, alpha: float,
    beta: float, temperature: float, normalize: bool, need_gradient: bool, with_kl: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """IKL's terms and the gradient of alpha * soft_ce + beta * wmse wrt the student, by hand.

    No autograd: inputs are plain (B, C) tensors of one float dtype (float32 or float64).
    Returns soft_ce (), kl () or None (unless `with_kl`), wmse (), gradient (B, C) or None.
    With d = t - s, p = softmax(logits / T) and lse = logsumexp(logits / T):

    soft_ce = mean_b (lse_s - sum_j p_t,j s_j / T), no T^2 (the official `loss_sce`);
           d soft_ce / d s = (p_s - p_t) / (T B).
    kl   = mean_b (sum_j p_t,j d_j / T - (lse_t - lse_s)): soft_ce minus the teacher entropy.
    wmse = 1/4 sum_b sum_{j,k} w_j w_k (d_j - d_k)^2 / N, N = B, or N = sum_b S_b^2 when
           `normalize`, through the closed form 1/4 sum_{j,k} w_j w_k (d_j - d_k)^2 =
           S/2 * sum_j w_j c_j^2, S = sum_j w_j, c = d - dbar, dbar = sum_j w_j d_j / S. Since
           sum_j w_j c_j = 0 the dbar term drops out: d wmse / d s_j = -S w_j c_j / N.
    Centring d before squaring keeps large logits exact (no cancellation of huge squares).
    lse = x_j - log p_j at j = argmax, where p_j >= 1/C: two max reductions, no exp pass.
    Every spent (B, C) buffer is reused in place: at B = 128, C = 1000 each one is 0.5 MB, and
    a fresh one costs about as much as the arithmetic on it (benchmarks/losses.py).
    """
    batch = student_logits.shape[0]
    # S, summed while w is in cache; an all-zero weight row has a zero double sum, and the
    # clamp only avoids 0/0 there.
    tiny = torch.finfo(weights.dtype).tiny
    weight_sum = weights.sum(dim=1, keepdim=True).clamp_min_(tiny)  # (B, 1) S
    unit = temperature == 1.0  # division by 1 is exact: skip it (the paper's T is 1)
    scaled_student = student_logits if unit else student_logits / temperature
    scaled_teacher = teacher_logits if unit else teacher_logits / temperature
    student_probs = torch.softmax(scaled_student, 1)  # (B, C)
    teacher_probs = torch.softmax(scaled_teacher, 1)  # (B, C); 0 where it underflows
    student_lse = scaled_student.amax(1) - student_probs.amax(1).log_()  # (B,)
    flat_teacher_probs = teacher_probs.view(-1)
    student_cross = torch.dot(flat_teacher_probs, student_logits.view(-1))  # sum p_t * s
    soft_ce = (student_lse.sum() - (student_cross if unit else student_cross / temperature)
               ) / batch
    kl = None
    if with_kl:
        gaps = teacher_logits - student_logits  # (B, C) d
        lse_gap = scaled_teacher.amax(1) - teacher_probs.amax(1).log_() - student_lse  # (B,)
        cross = torch.dot(flat_teacher_probs, gaps.view(-1))  # sum p_t * d
        kl = ((cross if unit else cross / temperature) - lse_gap.sum()) / batch
    gradient = None
    if need_gradient:  # the soft term's part, before p_t's buffer is spent
        gradient = student_probs.sub_(teacher_probs).mul_(alpha / (temperature * batch))
    if not with_kl:
        gaps = torch.sub(teacher_logits, student_logits, out=teacher_probs)  # (B, C) d
    weighted_gaps = weights * gaps  # (B, C) w * d
    mean_gap = weighted_gaps.sum(dim=1, keepdim=True).div_(weight_sum)  # (B, 1) dbar
    centred_gaps = gaps.sub_(mean_gap)  # (B, C) c = d - dbar
    torch.mul(weights, centred_gaps, out=weighted_gaps)  # (B, C) w * c, into the spent buffer
    spread = centred_gaps.mul_(weighted_gaps).sum(dim=1)  # (B,) sum_j w_j c_j^2
    scale = weight_sum.view(-1)  # (B,) S
    # N: the batch size, or (GKL) the batch total of sum_{j,k} w_j w_k = sum_b S_b^2.
    normaliser = scale.square().sum().clamp_min_(tiny) if normalize else batch
    wmse = torch.dot(scale, spread).mul_(0.5 / normaliser)
    if need_gradient:
        gradient.addcmul_(weighted_gaps, weight_sum * (-beta / normaliser))
    return soft_ce, kl, wmse, gradient


class _IKLFunction(torch.autograd.Function):
    """IKL-KD with its analytic gradient, computed in the forward pass into one (B, C) buffer.

    Why not autograd: through the closed form it records ~25 small kernels and took 3.1x
    KL-KD's time at B = 128, C = 1000 on CPU (benchmarks/losses.py has today's figure).
    Returns total, or (total, soft_ce, kl, wmse) `with_kl`; only total is differentiable, and
    only wrt the student. Not twice differentiable (nothing in distillation needs it)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, class_weights, alpha, beta, temperature,
                weight_temperature, gamma, normalize, with_kl):
        dtype = _compute_dtype(student_logits, teacher_logits)
        ctx.student_dtype = student_logits.dtype
        if class_weights is None:  # sample-wise: softmax(t / T2), in place of the quotient
            weights = torch.div(teacher_logits.to(_compute_dtype(teacher_logits)),
                                weight_temperature)
            weights = torch._softmax(weights, 1, False, out=weights)  # (B, C)
        elif class_weights.shape != teacher_logits.shape:
            raise ValueError(f"class_weights has shape {tuple(class_weights.shape)}, expected "
                             f"{tuple(teacher_logits.shape)} (one class-prior row per sample)")
        else:
            weights = class_weights.to(device=teacher_logits.device,
                                       dtype=_compute_dtype(teacher_logits, class_weights))
        if gamma != 1.0:
            weights = weights.pow(gamma)
        soft_ce, kl, wmse, gradient = _ikl_value_and_gradient(
            student_logits.to(dtype), teacher_logits.to(dtype), weights.to(dtype), alpha=alpha,
            beta=beta, temperature=temperature, normalize=normalize,
            need_gradient=ctx.needs_input_grad[0], with_kl=with_kl)
        ctx.save_for_backward(gradient)
        total = torch.add(soft_ce if alpha == 1.0 else soft_ce * alpha, wmse, alpha=beta)
        if not with_kl:
            return total
        ctx.mark_non_differentiable(soft_ce, kl, wmse)
        return total, soft_ce, kl, wmse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, *_unused):
        (gradient,) = ctx.saved_tensors
        if gradient is None:  # only the teacher or the class weights asked for one
            return (None,) * 10
        # The trainer's grad_total is exactly 1 (kd weight 1): a multiplication that changes no
        # bit but costs a (B, C) pass. Only on the CPU: reading it on a GPU would sync.
        if grad_total.device.type != "cpu" or grad_total.item() != 1.0:
            gradient = gradient * grad_total
        return (gradient.to(ctx.student_dtype),) + (None,) * 9


# ---------------------------------------------------------------------------------------------
# Modules and the training objective


def _validated(options, key_path: str):
    """`options` checked against the params schema (a dataclass built in code skips the checks
    load_params makes): a bad value raises ParamsError naming `key_path`."""
    return parse(type(options), dataclasses.asdict(options), key_path)


class KLDivergenceKD(nn.Module):
    """`kl_kd_loss` at `options.temperature`: forward(student_logits (B, C),
    teacher_logits (B, C)) -> (). `options.weight` is the objective's."""

    def __init__(self, options: KLParams = KLParams()):
        super().__init__()
        self.options = _validated(options, "student.kl")

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return kl_kd_loss(student_logits, teacher_logits, temperature=self.options.temperature)

    def extra_repr(self) -> str:
        return repr(self.options)


class IKLDivergenceKD(nn.Module):
    """`ikl_kd_loss` with `options`: forward(student_logits (B, C), teacher_logits (B, C),
    class_weights (B, C) or None) -> (); `terms(...)` -> IKLTerms, for logs. `options.weights`
    and `options.prior` say where the class weights come from: the caller's business."""

    def __init__(self, options: IKLParams = IKLParams()):
        super().__init__()
        self.options = _validated(options, "student.ikl")

    def _apply(self, student_logits, teacher_logits, class_weights, with_kl: bool):
        o = self.options
        return _IKLFunction.apply(student_logits, teacher_logits, class_weights, o.alpha, o.beta,
                                  o.temperature, o.weight_temperature, o.gamma, o.normalize,
                                  with_kl)

    def terms(self, student_logits: Tensor, teacher_logits: Tensor,
              class_weights: Tensor | None = None) -> IKLTerms:
        return IKLTerms(*self._apply(student_logits, teacher_logits, class_weights, True))

    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                class_weights: Tensor | None = None) -> Tensor:
        return self._apply(student_logits, teacher_logits, class_weights, False)

    def extra_repr(self) -> str:
        return repr(self.options)


# `student.loss` -> the module of its KD term, built from that loss's params section (`ce`:
# none, CE on the label alone).
KD_LOSSES: dict[str, type[nn.Module] | None] = {
    "ce": None, "kl": KLDivergenceKD, "ikl": IKLDivergenceKD}


class DistillationObjective(nn.Module):
    """The trainer's one loss: total = ce_weight * CE(student, label) + kd_weight * KD term.

    Built from the student's validated params (`student.loss`, `student.ce_weight` and that
    loss's section; kd_weight is `student.kl.weight` for kl, 1 for ikl, whose alpha and beta
    weigh its terms), or from None: a teacher's plain CE.
    forward(student_logits (B, C), labels (B,), teacher_logits (B, C) or None,
    class_weights (B, C) or None) -> {"loss": total (with gradient), "ce", and "kd" (kl), or
    "kd" (alpha * soft_ce + beta * wmse, the official value), "kd_soft_ce", "kd_kl" (soft_ce
    minus the teacher entropy), "kd_wmse" (ikl)}; every entry but "loss" is detached, for logs.
    `needs_teacher` / `needs_class_prior` tell the trainer what to fetch.
    """

    def __init__(self, student: StudentParams | None = None):
        super().__init__()
        loss = "ce" if student is None else student.loss
        if loss not in KD_LOSSES:
            raise ValueError(f"unknown loss {loss!r}; known losses: {', '.join(sorted(KD_LOSSES))}")
        kd_class = KD_LOSSES[loss]
        self.kd_loss = None if kd_class is None else kd_class(getattr(student, loss))
        self.ce_weight = 1.0 if student is None else student.ce_weight
        self.kd_weight = student.kl.weight if loss == "kl" else 1.0
        self.needs_teacher = self.kd_loss is not None
        self.needs_class_prior = loss == "ikl" and student.ikl.weights == "class_prior"

    def forward(self, student_logits: Tensor, labels: Tensor,
                teacher_logits: Tensor | None = None,
                class_weights: Tensor | None = None) -> dict[str, Tensor]:
        dtype = _compute_dtype(student_logits)
        ce = F.cross_entropy(student_logits.to(dtype), labels.long())
        terms = {"ce": ce}
        total = self.ce_weight * ce
        if self.kd_loss is not None:
            if teacher_logits is None:
                raise ValueError("this objective distils: pass teacher_logits (B, C)")
            if self.needs_class_prior and class_weights is None:
                raise ValueError("student.ikl.weights is class_prior: pass class_weights (B, C)")
            if not self.needs_class_prior and class_weights is not None:
                raise ValueError("class_weights given but student.ikl.weights is not class_prior")
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
