"""train_student (pipeline.train.runs) end to end on tiny digits-LT shards, against a real dump.

One module fixture (conftest's digits_stage_one) runs stage one for real on 86 rows: prepare,
a 1-epoch resnet8 teacher, dump_logits with k = C = 10 and the teacher's image size equal to the
student's, so the cache is exact up to float16 storage and can be compared with the live
teacher; a second dump keeps the top-2 and the quantised tail, which must come back within
TAIL_STEP / 2.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.train.runs

from pipeline.stream.augment import normalize
from pipeline.train.runs import (CachedTeacher, OnlineTeacher, crop_spec, load_model, run_batches,
                                train_student)
from pipeline.store.dump import dump_logits
from pipeline.train.losses import DistillationObjective
from pipeline.train.priors import PreviousEpochPrior
from pipeline.params import Params, ParamsError, check_consistency, parse, to_dict
from pipeline.data.manifest import file_sha256
from pipeline.store import StoreMismatchError, open_store
from pipeline.store.tail import TAIL_STEP
from pipeline.stream.views import CachedViews, StoredViews
from pipeline.stream.loader import split_shards, train_loader
from pipeline.train.loop import CHECKPOINT, load_checkpoint
from helpers import DIGITS_CLASSES, IMAGE_SIZE, SEED, digits_params
from helpers.stores import write_row_coded_store

NUM_CLASSES = DIGITS_CLASSES


def first_batch(shards_dir, manifest, params, store, epoch=0):
    views = (StoredViews(store, epoch, params.seed) if store is not None else
             CachedViews(params.seed, epoch, params.seed, params.logits.views,
                         crop=crop_spec(params.augment)))
    loader = train_loader(split_shards(shards_dir, manifest, "train"), views, batch_size=32,
                          image_size=IMAGE_SIZE, workers=0)
    return next(iter(loader))


def test_cached_and_online_teacher_give_the_same_loss(digits_stage_one):
    shards_dir, manifest, checkpoint, store_path = digits_stage_one
    params = digits_params()
    store = open_store(store_path, fingerprint=manifest["fingerprint"], seed=SEED,
                       teacher_sha256=file_sha256(checkpoint))
    assert (store.topk, store.num_classes, store.attributes["teacher_image_size"]) == (10, 10, 16)
    batch = first_batch(shards_dir, manifest, params, store)
    # The online student draws its views from the seed; at epoch e < V they are the crops the
    # teacher's logits were dumped on, in the same shuffled order.
    online_batch = first_batch(shards_dir, manifest, params, None)
    assert torch.equal(online_batch["rows"], batch["rows"])
    assert torch.equal(online_batch["images"], batch["images"])

    images = normalize(batch["images"])
    cached, _ = CachedTeacher(NUM_CLASSES, None, torch.device("cpu"))(batch, images)
    teacher, _ = load_model(checkpoint)
    online, weights = OnlineTeacher(teacher)(batch, images)
    assert weights is None and online.shape == cached.shape == (32, NUM_CLASSES)
    assert online.std() > 0.1  # a teacher that says something
    # float16 log-probabilities round to within 2**-11 of (logit - lse), logsumexp to 16 bits;
    # the rest is float32 batch-size noise.
    torch.testing.assert_close(cached, online, rtol=2**-10, atol=2e-3)

    student_logits = 3 * torch.randn(32, NUM_CLASSES, generator=torch.Generator().manual_seed(0))
    labels = batch["labels"]
    for loss in ("kl", "ikl"):
        objective = DistillationObjective(digits_params(loss=loss).student)
        from_cache = objective(student_logits, labels, cached, None)
        live = objective(student_logits, labels, online, None)
        for term in from_cache:
            torch.testing.assert_close(from_cache[term], live[term], rtol=2e-3, atol=2e-4,
                                       msg=f"{loss} {term}")


@pytest.fixture(scope="module")
def top2_tail_store(digits_stage_one, tmp_path_factory):
    """A dump of the stage-one teacher keeping the top-2 and the quantised tail."""
    shards_dir, _, checkpoint, _ = digits_stage_one
    path = str(tmp_path_factory.mktemp("top2") / "top2_tail.zarr")
    dump_logits(digits_params(logits={"topk": 2, "tail": "quantized"}), "teacher", shards_dir,
                checkpoint, path)
    return path


def test_cached_quantized_tail_matches_the_online_teacher(digits_stage_one, top2_tail_store):
    shards_dir, manifest, checkpoint, _ = digits_stage_one
    params = digits_params(logits={"topk": 2, "tail": "quantized"})
    store = open_store(top2_tail_store, fingerprint=manifest["fingerprint"], seed=SEED,
                       teacher_sha256=file_sha256(checkpoint))
    assert (store.topk, store.tail, store.exact_logits) == (2, "quantized", True)
    batch = first_batch(shards_dir, manifest, params, store)
    assert batch["topk_log_probs"].shape == (32, 2)
    components = store.attributes["tail_components"]
    assert batch["tail_coefficients"].shape == (32, components)
    assert batch["tail_coefficients"].dtype == torch.int8
    assert batch["tail_residuals"].shape == (32, NUM_CLASSES)
    assert batch["tail_residuals"].dtype == torch.int16
    images = normalize(batch["images"])
    cached, _ = CachedTeacher(NUM_CLASSES, None, torch.device("cpu"), store.tail_basis)(
        batch, images)
    teacher, _ = load_model(checkpoint)
    online, _ = OnlineTeacher(teacher)(batch, images)
    # Every class within half a step, TAIL_STEP / 2, plus the float16 / 16-bit rounding of the
    # exact top-k and the float32 batch-size noise.
    error = (cached - online).abs()
    assert (error <= TAIL_STEP / 2 + 2e-3).all(), error.max()
    top = batch["topk_classes"]
    torch.testing.assert_close(cached.gather(1, top), online.gather(1, top), rtol=2**-10,
                               atol=2e-3)
    # The losses and their gradients follow (measured here: 0.7 % off in gradient).
    student_logits = 3 * torch.randn(32, NUM_CLASSES, generator=torch.Generator().manual_seed(0))
    for loss in ("kl", "ikl"):
        objective = DistillationObjective(digits_params(loss=loss).student)
        gradients = []
        for targets in (cached, online):
            logits = student_logits.clone().requires_grad_()
            terms = objective(logits, batch["labels"], targets, None)
            objective.kd_loss(logits, targets).backward()  # the KD term's own gradient
            gradients.append((terms, logits.grad))
        (from_cache, cache_grad), (live, live_grad) = gradients
        for term in from_cache:
            torch.testing.assert_close(from_cache[term], live[term], rtol=1e-2, atol=1e-4,
                                       msg=f"{loss} {term}")
        relative = (cache_grad - live_grad).norm() / live_grad.norm()
        assert relative < 2e-2, f"{loss}: gradient {relative:.5f} off"  # DESIGN: within 2 %


def test_cached_teacher_gives_the_stored_prior_row_of_each_label(digits_stage_one):
    shards_dir, manifest, _, store_path = digits_stage_one
    params = digits_params()
    store = open_store(store_path)
    batch = first_batch(shards_dir, manifest, params, store)
    prior = store.class_prior(100.0)  # (C, C)
    _, weights = CachedTeacher(NUM_CLASSES, prior, torch.device("cpu"))(
        batch, normalize(batch["images"]))
    assert torch.equal(weights, torch.from_numpy(prior)[batch["labels"]])
    np.testing.assert_allclose(prior.sum(1), 1.0, rtol=1e-6)


def read_metrics(live_dir) -> dict:
    return json.loads((Path(live_dir) / "metrics.json").read_text())


IKL_TERMS = {"kd", "kd_soft_ce", "kd_kl", "kd_wmse"}


@pytest.mark.parametrize("student, kd_terms", [
    ({"loss": "ce"}, set()),
    ({"loss": "kl"}, {"kd"}),
    ({"loss": "ikl", "ikl": {"weights": "sample"}}, IKL_TERMS),
    ({"loss": "ikl", "ikl": {"weights": "class_prior"}}, IKL_TERMS),
    ({"loss": "ikl", "ikl": {"weights": "class_prior", "prior": "previous_epoch"}}, IKL_TERMS),
    ({"loss": "ikl", "online_teacher": True}, IKL_TERMS),
    ({"loss": "kl", "views_per_decode": 2}, {"kd"}),
], ids=["ce", "kl", "ikl-sample", "ikl-class_prior", "ikl-previous-epoch-prior", "ikl-online",
        "kl-two-views"])
def test_train_student_one_epoch_writes_checkpoint_and_metrics(digits_stage_one, tmp_path,
                                                               student, kd_terms):
    shards_dir, manifest, checkpoint, store_path = digits_stage_one
    uses_store = student["loss"] != "ce" and not student.get("online_teacher")
    if student["loss"] == "ce":  # CE needs neither the store nor the teacher
        store_path, checkpoint = str(tmp_path / "absent.zarr"), str(tmp_path / "absent.pt")
    params = digits_params(**student)
    out, live = tmp_path / "student", tmp_path / "live"
    metrics = train_student(params, shards_dir, store_path, checkpoint, str(out), str(live))

    assert {"train/loss", "train/ce", "train/lr", "val/top1", "val/top5"} <= set(metrics)
    assert {name for name in metrics if name.startswith("train/kd")} == {
        f"train/{term}" for term in kd_terms}
    assert all(np.isfinite(value) for value in metrics.values())
    state = load_checkpoint(out / CHECKPOINT)
    assert state["epoch"] == 0 and state["arch"] == "resnet8"
    assert state["fingerprint"] == manifest["fingerprint"]
    assert state["params"]["train"]["loss"] == student["loss"]
    # The resume identity names what the student learned from: the store's teacher, k and V.
    assert ("teacher_sha256" in state["targets"]) == uses_store
    assert state["targets"]["views"] == params.logits.views
    if uses_store:
        assert state["targets"]["topk"] == NUM_CLASSES
    model, _ = load_model(out / CHECKPOINT)
    assert model(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)).shape == (1, NUM_CLASSES)

    logged = read_metrics(live)  # dvclive: metrics.json and one .tsv per metric
    assert logged["step"] == 0
    assert logged["train"]["loss"] == pytest.approx(metrics["train/loss"])
    assert logged["val"]["top1"] == pytest.approx(metrics["val/top1"])
    assert (live / "plots" / "metrics" / "train" / "loss.tsv").is_file()


def test_train_student_refuses_a_store_of_another_dataset_or_teacher(digits_stage_one, tmp_path):
    shards_dir, manifest, checkpoint, store_path = digits_stage_one
    params = digits_params(loss="kl")
    other_teacher = tmp_path / "other_teacher.pt"
    state = load_checkpoint(checkpoint)
    state["epoch"] = 7  # any other bytes: another teacher as far as the store can tell
    torch.save(state, other_teacher)
    with pytest.raises(StoreMismatchError, match="teacher_sha256"):
        train_student(params, shards_dir, store_path, str(other_teacher),
                      str(tmp_path / "a"), str(tmp_path / "live_a"))

    other_dataset = tmp_path / "other_dataset.zarr"
    labels = np.zeros(manifest["splits"]["train"]["rows"], dtype=np.int64)
    write_row_coded_store(other_dataset, manifest, labels, fingerprint="f" * 64,
                          teacher_sha256=file_sha256(checkpoint))
    with pytest.raises(StoreMismatchError, match="fingerprint"):
        train_student(params, shards_dir, str(other_dataset), checkpoint,
                      str(tmp_path / "b"), str(tmp_path / "live_b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_online_teacher_with_class_prior_weights_is_refused_before_training():
    with pytest.raises(ParamsError, match="student.online_teacher"):
        digits_params(loss="ikl", online_teacher=True,
                    ikl={"weights": "class_prior", "weight_temperature": 1.0})


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("drop_last, sizes", [(False, [32, 32, 22]), (True, [32, 32])])
def test_steps_per_epoch_is_exact_with_any_number_of_workers(digits_stage_one, workers,
                                                             drop_last, sizes):
    shards_dir, manifest, _, _ = digits_stage_one
    params = digits_params(loss="ce", workers=workers, drop_last=drop_last)
    views = lambda epoch: CachedViews(params.seed, epoch, params.seed,  # noqa: E731
                                      params.logits.views, crop=crop_spec(params.augment))
    run = run_batches(params, params.student, manifest, shards_dir, "student", views)
    # The LR schedule spans epochs * steps_per_epoch: every epoch must take exactly that many.
    for epoch in range(3):
        batches = list(run["train_batches"](epoch))
        # 86 rows: ceil(86 / 32), or floor(86 / 32) dropping the short last batch
        assert len(batches) == run["steps_per_epoch"] == len(sizes)
        assert [len(b["labels"]) for b in batches] == sizes


def test_a_different_store_does_not_resume_the_student(digits_stage_one, tmp_path):
    """A finished student rerun against a store with other top-k trains again from scratch."""
    shards_dir, manifest, checkpoint, store_path = digits_stage_one
    params = digits_params()
    out, live = str(tmp_path / "student"), str(tmp_path / "live")
    train_student(params, shards_dir, store_path, checkpoint, out, live)
    first = load_checkpoint(Path(out) / CHECKPOINT)["model"]
    assert train_student(params, shards_dir, store_path, checkpoint, out, live)  # resumes: done
    assert all(torch.equal(first[k], v) for k, v in
               load_checkpoint(Path(out) / CHECKPOINT)["model"].items())
    top2 = tmp_path / "top2.zarr"
    dump_params = check_consistency(parse(Params, {**to_dict(params), "logits": {
        **to_dict(params.logits), "topk": 2}}, ""))
    dump_logits(dump_params, "teacher", shards_dir, checkpoint, str(top2))
    train_student(dump_params, shards_dir, str(top2), checkpoint, out, live)
    state = load_checkpoint(Path(out) / CHECKPOINT)
    assert state["targets"]["topk"] == 2 and state["epoch"] == 0
    assert not all(torch.equal(first[k], v) for k, v in state["model"].items())


def view_prior(store, view, temperature):
    """(C, C): per label, the mean of softmax(t / T2) over every row's crop `view`, read from
    the store directly (k = C: the stored logits are the teacher's, to float16)."""
    assert store.exact_logits
    logits = torch.from_numpy(store.teacher_logits(view, 0, store.rows)).double()  # (N, C)
    probs = torch.softmax(logits / temperature, dim=1)
    labels = torch.from_numpy(np.asarray(store.labels[:], dtype=np.int64))
    return torch.stack([probs[labels == c].mean(0) for c in range(NUM_CLASSES)])


def test_previous_epoch_prior_is_uniform_then_last_epochs_class_means(digits_stage_one,
                                                                     tmp_path, monkeypatch):
    """Official --GI: epoch 0 weighs with 1/C; epoch 1 with the per-class mean of
    softmax(t / T2) over epoch 0's crops (view 0 of every row: drop_last off, one rank)."""
    shards_dir, manifest, checkpoint, store_path = digits_stage_one
    temperature = 4.0  # not a stored prior temperature: this prior needs none
    params = digits_params(loss="ikl", epochs=2, drop_last=False, ikl={
        "weights": "class_prior", "prior": "previous_epoch", "weight_temperature": temperature,
        "gamma": 0.3, "normalize": True})
    used = []  # (labels, prior rows) of every step, in order
    real_weights = PreviousEpochPrior.weights

    def spy(self, labels):
        rows = real_weights(self, labels)
        used.append((labels.clone(), rows.clone()))
        return rows

    monkeypatch.setattr(PreviousEpochPrior, "weights", spy)
    train_student(params, shards_dir, store_path, checkpoint, str(tmp_path / "s"),
                  str(tmp_path / "live"))
    assert len(used) == 2 * 3  # 2 epochs of ceil(86 / 32) steps
    for _, rows in used[:3]:
        assert torch.equal(rows, torch.full_like(rows, 1 / NUM_CLASSES))
    store = open_store(store_path)
    epoch_zero = view_prior(store, 0, temperature)
    assert not torch.allclose(epoch_zero, view_prior(store, 1, temperature), atol=1e-3)
    for labels, rows in used[3:]:
        torch.testing.assert_close(rows.double(), epoch_zero[labels], rtol=0, atol=1e-6)
    # The checkpoint keeps the prior of the next epoch: epoch 1's crops (view 1).
    saved = load_checkpoint(tmp_path / "s" / CHECKPOINT)["class_prior"]["prior"]
    torch.testing.assert_close(saved.double(), view_prior(store, 1, temperature), rtol=0,
                               atol=1e-6)


def test_student_seed_sets_initial_weights_and_row_order_but_not_the_views(
        digits_stage_one, tmp_path, monkeypatch):
    shards_dir, manifest, checkpoint, store_path = digits_stage_one
    started = {}  # student.seed -> (initial weights, epoch 0's batches concatenated)

    def start_only(model, run, out_dir, live_dir):
        batches = list(run.train_batches(0))
        started[seed] = (model.state_dict(), {key: torch.cat([b[key] for b in batches])
                                              for key in batches[0]})
        return {}

    monkeypatch.setattr(pipeline.train.runs, "fit", start_only)
    for seed in (None, SEED, SEED + 5):
        train_student(digits_params(loss="kl", seed=seed, drop_last=False), shards_dir,
                      store_path, checkpoint, str(tmp_path / f"s{seed}"), str(tmp_path / "l"))
    default, same, other = (started[seed] for seed in (None, SEED, SEED + 5))
    for name, tensor in default[0].items():  # null: the global seed's weights and order
        assert torch.equal(same[0][name], tensor), name
    assert torch.equal(same[1]["rows"], default[1]["rows"])
    assert any(not torch.equal(other[0][name], t) for name, t in default[0].items())
    assert not torch.equal(other[1]["rows"], default[1]["rows"])  # another order...
    by_row = lambda batches: {key: value[batches["rows"].argsort()]  # noqa: E731
                              for key, value in batches.items()}
    for key, value in by_row(default[1]).items():  # ... of the same cached crops and logits
        assert torch.equal(by_row(other[1])[key], value), key
