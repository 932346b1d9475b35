"""Losses against slow, obviously-correct references (explicit C x C pair matrices, loops)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pipeline.params import IKLParams, KLParams, StudentParams, parse
from pipeline.train.losses import (
    KD_LOSSES,
    DistillationObjective,
    IKLDivergenceKD,
    KLDivergenceKD,
    ikl_kd_loss,
    kl_kd_loss,
)
from pipeline.train.priors import ClassPriorAccumulator, class_prior
from pipeline.store import teacher_logits_from_fields

BATCH, CLASSES = 6, 11
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}


# ---------------------------------------------------------------------------------------------
# Slow references
# ---------------------------------------------------------------------------------------------


def reference_kl(student_logits, teacher_logits, temperature):
    """T^2 * sum_c p_t (log p_t - log p_s), batch mean, written out term by term."""
    teacher = teacher_logits.detach() / temperature
    student = student_logits / temperature
    teacher_log_probs = teacher - torch.logsumexp(teacher, dim=1, keepdim=True)
    student_log_probs = student - torch.logsumexp(student, dim=1, keepdim=True)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(1)
    return kl.mean() * temperature**2


def reference_wmse(student_logits, teacher_logits, weights, normalize):
    """The official `loss_mse` with explicit (B, C, C) matrices: 1/4 sum_b sum_{j,k} w_j w_k
    ((t_j - t_k) - (s_j - s_k))^2, divided by B (IKL, DKLv1) or by the batch total
    sum_b sum_{j,k} w_j w_k (GKL, DKLv2: `... .sum() / p_n.sum()`)."""
    teacher = teacher_logits.detach()
    teacher_gaps = teacher[:, :, None] - teacher[:, None, :]  # (B, C, C) delta_n
    student_gaps = student_logits[:, :, None] - student_logits[:, None, :]  # (B, C, C) delta_a
    pair_weights = weights[:, :, None] * weights[:, None, :]  # (B, C, C) p_n
    total = 0.25 * (pair_weights * (teacher_gaps - student_gaps) ** 2).sum()
    return total / (pair_weights.sum() if normalize else student_logits.shape[0])


def reference_soft_ce(student_logits, teacher_logits, temperature):
    """The official `loss_sce`: -sum_j softmax(t/T)_j log_softmax(s/T)_j, batch mean, no T^2."""
    teacher_probs = torch.softmax(teacher_logits.detach() / temperature, dim=-1)
    return -(teacher_probs * F.log_softmax(student_logits / temperature, dim=-1)).sum(1).mean()


def reference_ikl(student_logits, teacher_logits, *, alpha, beta, temperature,
                  weight_temperature, class_weights, gamma, normalize):
    """The official `dkl_loss` (DKLv2 form, gamma on either weight): beta * loss_mse +
    alpha * loss_sce."""
    teacher = teacher_logits.detach()
    if class_weights is None:
        weights = torch.softmax(teacher / weight_temperature, dim=1)
    else:
        weights = class_weights
    weights = weights.detach() ** gamma
    return alpha * reference_soft_ce(student_logits, teacher, temperature) + beta * reference_wmse(
        student_logits, teacher, weights, normalize
    )


def ikl_kd_terms(student_logits, teacher_logits, class_weights=None, **options):
    """IKLTerms from the module holding `options` (IKLParams fields)."""
    return IKLDivergenceKD(IKLParams(**options)).terms(student_logits, teacher_logits,
                                                      class_weights)


def value_and_grad(loss_fn, student_logits, teacher_logits):
    student = student_logits.clone().requires_grad_(True)
    loss = loss_fn(student, teacher_logits)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def make_logits(dtype, scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(BATCH, CLASSES, generator=generator, dtype=torch.float64) * scale
    teacher = torch.randn(BATCH, CLASSES, generator=generator, dtype=torch.float64) * scale
    return student.to(dtype), teacher.to(dtype)


def make_class_weights(dtype, seed=1):
    generator = torch.Generator().manual_seed(seed)
    prior = torch.softmax(torch.randn(CLASSES, CLASSES, generator=generator) * 2, dim=1)
    labels = torch.randint(CLASSES, (BATCH,), generator=generator)
    return prior[labels].to(dtype)


# ---------------------------------------------------------------------------------------------
# IKL / KL against the references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("use_class_weights", [False, True])
@pytest.mark.parametrize("gamma", [1.0, 0.3])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_ikl_matches_pairwise_reference(dtype, use_class_weights, gamma, normalize, temperature):
    student, teacher = make_logits(dtype)
    options = dict(
        alpha=0.7,
        beta=1.3,
        temperature=temperature,
        weight_temperature=3.0,  # small enough that the weights vary a lot across classes
        class_weights=make_class_weights(dtype) if use_class_weights else None,
        gamma=gamma,
        normalize=normalize,
    )
    value, grad = value_and_grad(lambda s, t: ikl_kd_loss(s, t, **options), student, teacher)
    expected_value, expected_grad = value_and_grad(
        lambda s, t: reference_ikl(s, t, **options), student, teacher
    )
    assert value.dtype == dtype and grad.dtype == dtype
    assert relative_error(value, expected_value) < TOLERANCE[dtype]
    assert relative_error(grad, expected_grad) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_matches_reference(dtype, temperature):
    student, teacher = make_logits(dtype)
    loss = lambda s, t: kl_kd_loss(s, t, temperature=temperature)  # noqa: E731
    reference = lambda s, t: reference_kl(s, t, temperature)  # noqa: E731
    value, grad = value_and_grad(loss, student, teacher)
    expected_value, expected_grad = value_and_grad(reference, student, teacher)
    assert relative_error(value, expected_value) < TOLERANCE[dtype]
    assert relative_error(grad, expected_grad) < TOLERANCE[dtype]


def test_soft_term_has_no_temperature_squared_and_logs_the_official_value():
    # IKL's soft term is the official soft-label CE: no T^2 (KL-KD keeps it), so at T = 4 its
    # gradient is 1/16 of KL-KD's; the logged value is the CE, the KL part is CE - H(p_t).
    student, teacher = make_logits(torch.float64)
    temperature = 4.0
    loss = lambda s, t: ikl_kd_loss(s, t, alpha=1.0, beta=0.0, temperature=temperature)  # noqa
    value, grad = value_and_grad(loss, student, teacher)
    kl_value, kl_grad = value_and_grad(
        lambda s, t: kl_kd_loss(s, t, temperature=temperature), student, teacher)
    assert relative_error(grad * temperature**2, kl_grad) < 1e-12
    teacher_probs = torch.softmax(teacher / temperature, dim=1)
    entropy = -(teacher_probs * teacher_probs.log()).sum(1).mean()
    terms = ikl_kd_terms(student, teacher, alpha=1.0, beta=0.0, temperature=temperature)
    assert torch.allclose(terms.soft_ce, reference_soft_ce(student, teacher, temperature),
                          rtol=1e-12)
    assert torch.allclose(value, terms.soft_ce, rtol=1e-15)
    assert torch.allclose(terms.kl, terms.soft_ce - entropy, rtol=1e-12)
    assert torch.allclose(terms.kl * temperature**2, kl_value, rtol=1e-12)


def test_generalised_normaliser_is_the_batch_total():
    # GKL divides the batch's double sum by its total pair weight sum_b S_b^2, not each sample
    # by its own S_b^2: with rows of different total weight the two differ.
    student, teacher = make_logits(torch.float64)
    weights = make_class_weights(torch.float64) * torch.linspace(0.2, 3.0, BATCH)[:, None]
    options = dict(alpha=0.0, beta=1.0, class_weights=weights, normalize=True)
    wmse = ikl_kd_terms(student, teacher, **options).wmse
    pairs = weights[:, :, None] * weights[:, None, :]  # (B, C, C)
    gaps = (teacher - student)[:, :, None] - (teacher - student)[:, None, :]
    per_sample = 0.25 * (pairs * gaps**2).sum((1, 2))  # (B,)
    assert torch.allclose(wmse, per_sample.sum() / pairs.sum(), rtol=1e-12)
    assert not torch.allclose(wmse, (per_sample / pairs.sum((1, 2))).mean(), rtol=1e-3)
    # sum_{j,k} w_j w_k = S^2 per sample (the closed form's normaliser)
    assert torch.allclose(pairs.sum(), weights.sum(1).square().sum(), rtol=1e-12)


def test_wmse_zero_when_student_is_teacher_plus_row_constant():
    student, teacher = make_logits(torch.float64)
    shifted = (teacher + torch.randn(BATCH, 1, dtype=torch.float64) * 50).requires_grad_(True)
    for normalize in (False, True):
        options = dict(alpha=0.0, beta=1.0, weight_temperature=2.0, normalize=normalize)
        total, _, _, wmse = ikl_kd_terms(shifted, teacher, **options)
        (grad,) = torch.autograd.grad(total, shifted)
        # zero up to the rounding of the shift itself (|t + c| ~ 50, float64 eps ~ 1e-16)
        assert wmse.abs() < 1e-20 and grad.abs().max() < 1e-12
        assert ikl_kd_terms(student, teacher, **options).wmse > 0


def test_terms_are_detached_and_sum_to_total():
    student, teacher = make_logits(torch.float64)
    student.requires_grad_(True)
    total, soft_ce, kl, wmse = ikl_kd_terms(student, teacher, alpha=2.0, beta=3.0)
    assert total.requires_grad
    assert not (soft_ce.requires_grad or kl.requires_grad or wmse.requires_grad)
    assert torch.allclose(total, 2.0 * soft_ce + 3.0 * wmse, rtol=1e-15)
    assert torch.allclose(kl, kl_kd_loss(student, teacher, temperature=1.0), rtol=1e-12)
    with torch.no_grad():  # no gradient needed: same value
        assert torch.equal(ikl_kd_loss(student, teacher, alpha=2.0, beta=3.0), total.detach())


def test_beta_zero_gradient_is_alpha_times_kl_gradient():
    student, teacher = make_logits(torch.float64)
    alpha = 2.5
    ikl = lambda s, t: ikl_kd_loss(s, t, alpha=alpha, beta=0.0)  # noqa: E731
    kl = lambda s, t: kl_kd_loss(s, t, temperature=1.0)  # noqa: E731
    _, ikl_grad = value_and_grad(ikl, student, teacher)
    _, kl_grad = value_and_grad(kl, student, teacher)
    assert relative_error(ikl_grad, alpha * kl_grad) < 1e-12


def test_teacher_and_weights_get_no_gradient():
    student, teacher = make_logits(torch.float32)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    class_weights = make_class_weights(torch.float32).requires_grad_(True)
    ikl_kd_loss(student, teacher, alpha=1.0, beta=1.0, class_weights=class_weights).backward()
    assert student.grad is not None
    assert teacher.grad is None and class_weights.grad is None


@pytest.mark.parametrize("normalize", [False, True])
def test_large_logits_stay_finite_and_exact(normalize):
    student, teacher = make_logits(torch.float64, scale=1e4)
    options = dict(alpha=1.0, beta=1.0, weight_temperature=100.0, normalize=normalize)
    expected_value, expected_grad = value_and_grad(
        lambda s, t: reference_ikl(s, t, temperature=1.0, class_weights=None, gamma=1.0,
                                   **options),
        student, teacher,
    )
    value, grad = value_and_grad(
        lambda s, t: ikl_kd_loss(s, t, **options), student.float(), teacher.float()
    )
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert relative_error(value.double(), expected_value) < 1e-4
    assert relative_error(grad.double(), expected_grad) < 1e-4


def test_half_precision_inputs_are_computed_in_float32():
    student, teacher = make_logits(torch.float32, scale=8.0)
    for half in (torch.float16, torch.bfloat16):
        student_half, teacher_half = student.to(half), teacher.to(half)
        options = dict(alpha=1.0, beta=1.0)
        value, grad = value_and_grad(
            lambda s, t: ikl_kd_loss(s, t, **options), student_half, teacher_half
        )
        assert value.dtype == torch.float32 and grad.dtype == half
        assert torch.isfinite(value) and torch.isfinite(grad).all()
        # Same as float32 on the half-rounded inputs: only the final grad cast loses precision.
        expected_value, expected_grad = value_and_grad(
            lambda s, t: ikl_kd_loss(s, t, **options), student_half.float(), teacher_half.float()
        )
        assert relative_error(value, expected_value) < 1e-6
        assert relative_error(grad.float(), expected_grad) < 1e-2
    # magnitudes near float16's range: squared gaps would overflow if computed in float16
    big = (torch.randn(BATCH, CLASSES) * 3e4).clamp(-6e4, 6e4)
    value, grad = value_and_grad(
        lambda s, t: ikl_kd_loss(s, t, alpha=1.0, beta=1.0), big.half(), big.flip(1).half()
    )
    assert torch.isfinite(value) and torch.isfinite(grad).all()


def test_modules_equal_pure_functions():
    student, teacher = make_logits(torch.float64)
    class_weights = make_class_weights(torch.float64)
    module = IKLDivergenceKD(IKLParams(alpha=2.0, beta=0.5, gamma=0.3, normalize=True))
    expected = ikl_kd_loss(student, teacher, alpha=2.0, beta=0.5, gamma=0.3, normalize=True,
                           class_weights=class_weights)
    assert module(student, teacher, class_weights) == expected
    assert KLDivergenceKD(KLParams(temperature=3.0))(student, teacher) == kl_kd_loss(
        student, teacher, temperature=3.0
    )
    with pytest.raises(ValueError, match="temperature"):
        KLDivergenceKD(KLParams(temperature=0.0))


# ---------------------------------------------------------------------------------------------
# Top-k expansion (the store's decoder for `tail: none`, pipeline.store.encoding)
# ---------------------------------------------------------------------------------------------


def store_topk(full_logits, k, logits_dtype=torch.float16, class_dtype=torch.int16):
    """What a top-k-only store holds: descending top-k logits, their classes, lse over all C."""
    values, classes = full_logits.topk(k, dim=1)
    return values.to(logits_dtype), classes.to(class_dtype), torch.logsumexp(full_logits, dim=1)


def expand_topk(values, classes, lse, num_classes):
    """The store's decoder (`tail: none`) on raw top-k logits: log-probabilities + lse."""
    fields = {"topk_log_probs": values.float() - lse[:, None], "topk_classes": classes,
              "logsumexp": lse}
    return teacher_logits_from_fields(fields, num_classes)


@pytest.mark.parametrize("class_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_expand_topk_full_k_reproduces_logits_and_losses(class_dtype):
    student, teacher = make_logits(torch.float32, scale=4.0)
    values, classes, lse = store_topk(teacher, CLASSES, torch.float32, class_dtype)
    expanded = expand_topk(values, classes, lse, CLASSES)
    assert expanded.dtype == torch.float32 and expanded.shape == (BATCH, CLASSES)
    torch.testing.assert_close(expanded, teacher, rtol=0, atol=2e-6)
    for loss in (
        lambda t: ikl_kd_loss(student, t, alpha=1.0, beta=1.0),
        lambda t: kl_kd_loss(student, t, temperature=2.0),
    ):
        torch.testing.assert_close(loss(expanded), loss(teacher), rtol=1e-5, atol=0)


@pytest.mark.parametrize("class_dtype", [torch.uint8, torch.int32])
def test_expand_topk_keeps_topk_probs_and_spreads_residual(class_dtype):
    _, teacher = make_logits(torch.float32, scale=2.0)
    k = 4
    values, classes, lse = store_topk(teacher, k, torch.float32, class_dtype)
    probs = torch.softmax(expand_topk(values, classes, lse, CLASSES), dim=1)  # (B, C)
    true_probs = torch.softmax(teacher, dim=1)
    topk_index = classes.long()
    assert torch.allclose(probs.gather(1, topk_index), true_probs.gather(1, topk_index),
                          rtol=1e-5, atol=0)
    in_topk = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, topk_index, True)
    residual = 1 - true_probs.gather(1, topk_index).sum(1)  # (B,)
    tail = probs[~in_topk].view(BATCH, CLASSES - k)
    assert torch.allclose(tail, (residual / (CLASSES - k))[:, None].expand_as(tail), rtol=1e-4)


def test_expand_topk_float16_noise_stays_finite():
    # A confident teacher: float16 rounding can make the top-k probs sum above 1.
    teacher = torch.zeros(BATCH, CLASSES)
    teacher[:, 0] = 40.0
    values, classes, lse = store_topk(teacher, 3)
    values[:, 0] += 0.05  # rounding noise pushing the top prob past 1
    expanded = expand_topk(values, classes, lse, CLASSES)
    assert torch.isfinite(expanded).all()
    student = torch.randn(BATCH, CLASSES, requires_grad=True)
    loss = ikl_kd_loss(student, expanded, alpha=1.0, beta=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


# ---------------------------------------------------------------------------------------------
# Class prior
# ---------------------------------------------------------------------------------------------


def test_class_prior_matches_per_class_loop():
    generator = torch.Generator().manual_seed(3)
    classes, samples, weight_temperature = 5, 40, 2.0
    teacher = torch.randn(samples, classes, generator=generator) * 3
    labels = torch.randint(classes - 1, (samples,), generator=generator)  # last class empty
    prior = class_prior(teacher, labels, classes, weight_temperature=weight_temperature)
    assert prior.shape == (classes, classes) and prior.dtype == torch.float32
    assert torch.allclose(prior.sum(1), torch.ones(classes), atol=1e-6)
    for label in range(classes):
        rows = [torch.softmax(teacher[i].double() / weight_temperature, dim=0)
                for i in range(samples) if labels[i] == label]
        expected = (sum(rows) / len(rows)) if rows else torch.full((classes,), 1 / classes)
        assert torch.allclose(prior[label].double(), expected.double(), atol=1e-7)


def test_class_prior_accumulates_over_batches():
    generator = torch.Generator().manual_seed(4)
    teacher = torch.randn(30, 7, generator=generator) * 5
    labels = torch.randint(7, (30,), generator=generator, dtype=torch.int64).to(torch.uint8)
    accumulator = ClassPriorAccumulator(7, weight_temperature=1.0)
    for batch in (slice(0, 9), slice(9, 20), slice(20, 30)):
        accumulator.update(teacher[batch], labels[batch])
    one_shot = class_prior(teacher, labels, 7, weight_temperature=1.0)
    assert torch.allclose(accumulator.compute(), one_shot, atol=1e-7)
    assert accumulator.counts.sum() == 30 and accumulator.sums.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# Objective and registry
# ---------------------------------------------------------------------------------------------


def test_registry_builds_each_loss_and_rejects_unknown():
    student, teacher = make_logits(torch.float32)
    labels = torch.arange(BATCH) % CLASSES
    ce = DistillationObjective(StudentParams(loss="ce"))
    assert not ce.needs_teacher
    terms = ce(student, labels)
    assert set(terms) == {"loss", "ce"}
    assert torch.allclose(terms["loss"], F.cross_entropy(student, labels))

    kl = DistillationObjective(StudentParams(loss="kl", kl=KLParams(weight=4.0)))
    terms = kl(student, labels, teacher)
    expected = F.cross_entropy(student, labels) + 4.0 * kl_kd_loss(student, teacher, temperature=1)
    assert torch.allclose(terms["loss"], expected)

    ikl = DistillationObjective(StudentParams(loss="ikl", ce_weight=0.5,
                                              ikl=IKLParams(alpha=3.0, beta=4.0)))
    student.requires_grad_(True)
    terms = ikl(student, labels, teacher)
    expected = 0.5 * F.cross_entropy(student, labels) + ikl_kd_loss(
        student, teacher, alpha=3.0, beta=4.0
    )
    assert torch.allclose(terms["loss"], expected)
    assert set(terms) == {"loss", "ce", "kd", "kd_soft_ce", "kd_kl", "kd_wmse"}
    assert terms["loss"].requires_grad and not terms["kd_wmse"].requires_grad

    with pytest.raises(ValueError, match="ce, ikl, kl"):
        DistillationObjective(StudentParams(loss="dkd"))
    # The options are the params sections: a wrong option fails there, naming the known ones.
    with pytest.raises(ValueError, match="alpha"):
        parse(StudentParams, {"loss": "ikl", "ikl": {"alph": 1.0}}, "student")
    with pytest.raises(ValueError, match="known"):
        parse(StudentParams, {"loss": "kl", "kl": {"alpha": 1.0}}, "student")
    assert set(KD_LOSSES) == {"ce", "kl", "ikl"}
    # params accepts exactly the registry's names (one list, checked against the other)
    _, accepts = {f.name: f for f in dataclasses.fields(StudentParams)}["loss"].metadata["rule"]
    assert all(accepts(name) for name in KD_LOSSES) and not accepts("dkd")


def test_objective_from_params_has_no_teacher_for_a_teacher():
    objective = DistillationObjective()  # a teacher's: CE on the label alone
    student, _ = make_logits(torch.float32)
    labels = torch.arange(BATCH) % CLASSES
    assert not objective.needs_teacher and not objective.needs_class_prior
    assert torch.equal(objective(student, labels)["loss"], F.cross_entropy(student, labels))


def test_class_prior_objective_requires_class_weights():
    student, teacher = make_logits(torch.float32)
    labels = torch.arange(BATCH) % CLASSES
    prior = class_prior(teacher, labels, CLASSES, weight_temperature=1.0)
    objective = DistillationObjective(StudentParams(loss="ikl", ikl=IKLParams(
        alpha=4.0, beta=4.0, weight_temperature=1.0, gamma=0.3, normalize=True,
        weights="class_prior")))
    assert objective.needs_class_prior
    with pytest.raises(ValueError, match="class_weights"):
        objective(student, labels, teacher)
    terms = objective(student, labels, teacher, prior[labels])
    expected = F.cross_entropy(student, labels) + ikl_kd_loss(
        student, teacher, alpha=4.0, beta=4.0, class_weights=prior[labels], gamma=0.3,
        normalize=True,
    )
    assert torch.allclose(terms["loss"], expected)
    with pytest.raises(ValueError, match="teacher_logits"):
        DistillationObjective(StudentParams(loss="kl"))(student, labels)
