"""Wiring of the shared training loop for teachers (CE) and students (CE / KL-KD / IKL-KD
against cached or online teacher logits)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.stream.augment import DECODE, CropSpec
from pipeline.train.checkpoints import load_model
from pipeline.stream.device_decode import (check_replay_decode, decode_path, decode_summary,
                                    warn_if_decoded_elsewhere)
from pipeline.errors import UserError
from pipeline.train.losses import DistillationObjective, PreviousEpochPrior, distillation_objective
from pipeline.train.models import build_model, load_weights
from pipeline.params import AugmentParams, Params, StudentParams, TrainParams, to_dict
from pipeline.data.manifest import file_sha256, load_manifest
from pipeline.store import (LOGIT_FIELDS, LogitStore, TailBasis, open_store,
                            teacher_logits_from_fields)
from pipeline.distributed import distributed
from pipeline.stream.loader import TrainStream, ViewSource, epoch_steps, eval_loader, split_shards
from pipeline.train.loop import TrainRun, fit


# Store attributes that change what a student learns (its resume identity includes them).
STORE_IDENTITY = ("teacher_sha256", "fingerprint", "seed", "augmentation", "views", "topk",
                  "tail", "teacher_image_size", "decode")


def crop_spec(augment: AugmentParams) -> CropSpec:
    return CropSpec(scale=augment.crop_scale, ratio=augment.crop_ratio,
                    flip_probability=augment.flip_probability)


def model_identity(settings: TrainParams, params: Params, manifest: dict) -> dict:
    """What a checkpoint records to rebuild its model and to decide whether it can resume
    (with the starting weights file's sha256 when it has one)."""
    identity = {"arch": settings.arch, "small_input": settings.small_input,
                "num_classes": manifest["num_classes"], "fingerprint": manifest["fingerprint"],
                "params": {"seed": params.seed, "augment": to_dict(params.augment),
                           "train": to_dict(settings)}}
    if settings.weights:
        if not Path(settings.weights).is_file():
            raise UserError(f"{settings.weights}: weights file not found (params `weights`)")
        identity["weights_sha256"] = file_sha256(settings.weights)
    return identity


def train_teacher(params: Params, name: str, shards_dir: str, out_dir: str,
                  live_dir: str) -> dict:
    """Train `teachers[name]` with CE; checkpoint in out_dir, dvclive output in live_dir."""
    settings = params.teachers[name]
    manifest = load_manifest(shards_dir)
    if params.logits.topk > manifest["num_classes"]:  # else the dump fails after training
        raise UserError(f"logits.topk: {params.logits.topk} exceeds the "
                        f"{manifest['num_classes']} classes of {shards_dir}; set logits.topk "
                        f"<= {manifest['num_classes']} before training the teacher")
    run = _run(params, settings, manifest, shards_dir, distillation_objective("ce"),
               store=None, key=f"teachers.{name}", description=name)
    return fit(_new_model(settings, manifest, params.seed), run, out_dir, live_dir)


def train_student(params: Params, shards_dir: str, store_path: str, teacher_checkpoint: str,
                  out_dir: str, live_dir: str) -> dict:
    """Train the student against its teacher's logit store (or the live teacher when
    `student.online_teacher`)."""
    settings = params.student
    manifest = load_manifest(shards_dir)
    objective = student_objective(settings)
    device = distributed().device
    store, targets = None, None
    # GI prior: the store's (exact, from the first step) or the previous epoch's (official).
    previous_epoch = objective.needs_class_prior and settings.ikl.prior == "previous_epoch"
    store_prior = objective.needs_class_prior and not previous_epoch
    # The cached views; a store's own attributes replace these when the student reads one.
    teacher_identity = {"views": params.logits.views}
    if objective.needs_teacher and settings.online_teacher:
        teacher, _ = load_model(teacher_checkpoint)
        targets = OnlineTeacher(teacher.to(device), params.teachers[settings.teacher].precision)
        teacher_identity.update(online_teacher_sha256=file_sha256(teacher_checkpoint))
    elif objective.needs_teacher:
        store = open_store(store_path, fingerprint=manifest["fingerprint"], seed=params.seed,
                           teacher_sha256=file_sha256(teacher_checkpoint))
        check_store_serves(store, settings)
        prior = store.class_prior(settings.ikl.weight_temperature) if store_prior else None
        targets = CachedTeacher(manifest["num_classes"], prior, device, store.tail_basis)
        teacher_identity = {key: store.attributes.get(key) for key in STORE_IDENTITY}
    decode = student_decode_path(settings, device, store)
    if distributed().is_main:
        print("student: " + decode_summary(decode, settings.decode, device,
                                           follows_store=store is not None), flush=True)
    class_prior = (PreviousEpochPrior(manifest["num_classes"], device=device,
                                      weight_temperature=settings.ikl.weight_temperature)
                   if previous_epoch else None)
    run = _run(params, settings, manifest, shards_dir, objective, store=store,
               teacher_targets=targets, teacher_identity=teacher_identity,
               class_prior=class_prior, key="student", description="student", decode=decode)
    seed = params.seed if settings.seed is None else settings.seed
    return fit(_new_model(settings, manifest, seed), run, out_dir, live_dir)


def check_store_serves(store: LogitStore, settings: StudentParams) -> None:
    """Refuse, before training, an IKL student on a store without every class's logit: IKL's
    weighted MSE weighs each tail class's own logit like a head class's, so the even fill of a
    top-k-only store trains a different loss (20-60 % off in gradient, BENCHMARKS.md)."""
    if (settings.loss == "ikl" and not store.exact_logits
            and not settings.ikl.approximate_tail):
        raise UserError(
            f"logit store {store.path} keeps only the top-{store.topk} of {store.num_classes} "
            "logits (tail: none), but IKL's weighted MSE needs every class's logit; set "
            "logits.tail: quantized and rerun dump_logits (dvc repro), or set "
            "student.ikl.approximate_tail: true to train on the evenly filled tail anyway")


def student_decode_path(settings: StudentParams, device: torch.device,
                        store: LogitStore | None) -> str:
    """The student's decode path: `student.decode` resolved on `device`, following the store
    it replays, if any; a store dumped through another path is refused (UserError), and one
    decoded on another kind of device is named in one line."""
    if store is None:
        return decode_path(settings.decode, device)
    # Stores from before the decode path was recorded decoded every view at full size with
    # Pillow, which the CPU path does for them too (no drafted crop at those sizes).
    recorded = store.attributes.get("decode", DECODE)
    path = decode_path(settings.decode, device, recorded)
    check_replay_decode(store.path, recorded, path)
    warn_if_decoded_elsewhere(store.path, store.attributes.get("decode_device"), path, device)
    return path


def student_objective(settings: StudentParams) -> DistillationObjective:
    """The objective named by `student.loss`, with that loss's options."""
    if settings.loss == "kl":
        return distillation_objective("kl", ce_weight=settings.ce_weight,
                                      weight=settings.kl.weight,
                                      temperature=settings.kl.temperature)
    if settings.loss == "ikl":
        ikl = settings.ikl
        return distillation_objective(
            "ikl", ce_weight=settings.ce_weight, alpha=ikl.alpha, beta=ikl.beta,
            temperature=ikl.temperature, weight_temperature=ikl.weight_temperature,
            gamma=ikl.gamma, normalize=ikl.normalize,
            use_class_prior=ikl.weights == "class_prior")
    return distillation_objective("ce", ce_weight=settings.ce_weight)


class CachedTeacher:
    """Teacher targets from the store's fields in the batch: full (B, C) logits decoded on the
    training device (`teacher_logits_from_fields`), and GI class weights (the prior's row for
    each label) when a prior is given."""

    def __init__(self, num_classes: int, class_prior, device: torch.device,
                 tail_basis: TailBasis | None = None):
        self.num_classes = num_classes
        self.prior = None if class_prior is None else torch.as_tensor(class_prior).to(device)
        self.device = device
        self.tail_basis = None if tail_basis is None else tail_basis.to(device)

    def __call__(self, batch: dict, images: torch.Tensor) -> tuple:
        to_device = lambda key: batch[key].to(self.device, non_blocking=True)  # noqa: E731
        fields = {name: to_device(name) for name in LOGIT_FIELDS if name in batch}
        teacher_logits = teacher_logits_from_fields(fields, self.num_classes,
                                                    self.tail_basis)  # (B, C)
        weights = None if self.prior is None else self.prior[to_device("labels")]  # (B, C)
        return teacher_logits, weights


class OnlineTeacher:
    """Teacher targets from running the (frozen) teacher on the student's own crops: the
    comparison the cache is measured against, and the official script's setting. No stored
    prior (GI weights come from the previous epoch, see PreviousEpochPrior). On CUDA under
    bf16 autocast unless the teacher's `precision` is fp32."""

    def __init__(self, teacher: nn.Module, precision: str = "bf16"):
        self.teacher = teacher.eval().requires_grad_(False)  # frozen once
        self.precision = precision

    @torch.no_grad()
    def __call__(self, batch: dict, images: torch.Tensor) -> tuple:
        bf16 = images.device.type == "cuda" and self.precision == "bf16"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            return self.teacher(images).float(), None


def _new_model(settings: TrainParams, manifest: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the same initial weights on every rank and run of this seed
    model = build_model(settings.arch, manifest["num_classes"], small_input=settings.small_input)
    if settings.weights:
        load_weights(model, settings.weights, reset_head=settings.reset_head)
    return model


def rank_batch_size(batch_size: int, world_size: int, key: str) -> int:
    """Each rank's share of the global `batch_size`; refuses one that does not split evenly."""
    if batch_size % world_size:
        raise UserError(f"{key}.batch_size: {batch_size} does not split evenly over "
                        f"{world_size} ranks (batch_size is the global batch); use a multiple "
                        f"of {world_size}")
    return batch_size // world_size


def _run(params: Params, settings: TrainParams, manifest: dict, shards_dir: str,
         objective: DistillationObjective, *, store: LogitStore | None, key: str,
         teacher_targets=None, teacher_identity: dict | None = None,
         class_prior: PreviousEpochPrior | None = None, description: str,
         decode: str = DECODE) -> TrainRun:
    train_shards = split_shards(shards_dir, manifest, "train")
    val_split = "val" if "val" in manifest["splits"] else "test"
    is_student = isinstance(settings, StudentParams)
    views_per_decode = settings.views_per_decode if is_student else 1
    # The student's own seed orders its rows; its views stay the store's (the global seed).
    shuffle_seed = settings.seed if is_student else None
    ranks = distributed()
    pin = ranks.device.type == "cuda"
    batch_size = rank_batch_size(settings.batch_size, ranks.world_size, key)

    # One stream per run: its workers start once and serve every epoch.
    views = ViewSource(params.seed, 0, views_per_decode, crop_spec(params.augment), store,
                       cached_views=params.logits.views if is_student else 0,
                       shuffle_seed=shuffle_seed)
    stream = TrainStream(train_shards, views, batch_size=batch_size,
                         image_size=settings.image_size, workers=settings.workers,
                         rank=ranks.rank, world_size=ranks.world_size, pin_memory=pin,
                         drop_last=settings.drop_last, decode=decode)
    train_batches = stream.epoch

    def eval_batches(split: str):
        shards = split_shards(shards_dir, manifest, split)
        return lambda: eval_loader(shards, batch_size=params.evaluate.batch_size,
                                   image_size=settings.image_size, workers=settings.workers,
                                   rank=ranks.rank, world_size=ranks.world_size, pin_memory=pin)

    rows = manifest["splits"]["train"]["rows"]
    steps_per_epoch = epoch_steps(rows, views_per_decode, batch_size, ranks.world_size,
                                  drop_last=settings.drop_last)
    if steps_per_epoch == 0:
        raise UserError(f"{key}.batch_size: {settings.batch_size} is more than the "
                        f"{rows * views_per_decode} training samples of an epoch and "
                        "drop_last is set: no step would be taken; lower it")
    identity = model_identity(settings, params, manifest)
    if is_student:  # what the student learns from: a checkpoint resumes only if it is unchanged
        identity["targets"] = teacher_identity
    test_batches = eval_batches("test") if params.evaluate.every_epoch_on_test else None
    return TrainRun(settings, objective, train_batches, eval_batches(val_split),
                    steps_per_epoch=steps_per_epoch, identity=identity,
                    teacher_targets=teacher_targets, class_prior=class_prior,
                    test_batches=test_batches, description=description)
