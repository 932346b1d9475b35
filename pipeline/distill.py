"""Wiring of the shared training loop for teachers (CE) and students (CE / KL-KD / IKL-KD
against cached or online teacher logits)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.augment import CropSpec
from pipeline.losses import DistillationObjective, distillation_objective, expand_topk
from pipeline.models import build_model, load_weights
from pipeline.params import AugmentParams, Params, StudentParams, TrainParams, to_dict
from pipeline.shards import file_sha256, load_manifest
from pipeline.store import LogitStore, open_store
from pipeline.distributed import distributed
from pipeline.errors import UserError
from pipeline.stream import ViewSource, epoch_steps, eval_loader, split_shards, train_loader
from pipeline.train import TrainRun, fit, load_checkpoint


# Store attributes that change what a student learns (its resume identity includes them).
STORE_IDENTITY = ("teacher_sha256", "fingerprint", "seed", "augmentation", "views", "topk",
                  "teacher_image_size")


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


def load_model(checkpoint_path: str | Path) -> tuple[nn.Module, dict]:
    """A trained model (on the CPU, eval mode) and its checkpoint."""
    state = load_checkpoint(checkpoint_path)
    model = build_model(state["arch"], state["num_classes"], small_input=state["small_input"])
    model.load_state_dict(state["model"])
    return model.eval(), state


def train_teacher(params: Params, name: str, shards_dir: str, out_dir: str,
                  live_dir: str) -> dict:
    """Train `teachers[name]` with CE; checkpoint in out_dir, dvclive output in live_dir."""
    settings = params.teachers[name]
    manifest = load_manifest(shards_dir)
    run = _run(params, settings, manifest, shards_dir, distillation_objective("ce"),
               store=None, description=name)
    return fit(_new_model(settings, manifest, params.seed), run, out_dir, live_dir)


def train_student(params: Params, shards_dir: str, store_path: str, teacher_checkpoint: str,
                  out_dir: str, live_dir: str) -> dict:
    """Train the student against its teacher's logit store (or the live teacher when
    `student.online_teacher`)."""
    settings = params.student
    manifest = load_manifest(shards_dir)
    objective = student_objective(settings)
    store, targets = None, None
    # The cached views; a store's own attributes replace these when the student reads one.
    teacher_identity = {"views": params.logits.views}
    if objective.needs_teacher and settings.online_teacher:
        teacher, _ = load_model(teacher_checkpoint)
        targets = OnlineTeacher(teacher.to(distributed().device))
        teacher_identity.update(online_teacher_sha256=file_sha256(teacher_checkpoint))
    elif objective.needs_teacher:
        store = open_store(store_path, fingerprint=manifest["fingerprint"], seed=params.seed,
                           teacher_sha256=file_sha256(teacher_checkpoint))
        prior = (store.class_prior(settings.ikl.weight_temperature)
                 if objective.needs_class_prior else None)
        targets = CachedTeacher(manifest["num_classes"], prior, distributed().device)
        teacher_identity = {key: store.attributes[key] for key in STORE_IDENTITY}
    run = _run(params, settings, manifest, shards_dir, objective, store=store,
               teacher_targets=targets, teacher_identity=teacher_identity,
               description="student")
    return fit(_new_model(settings, manifest, params.seed), run, out_dir, live_dir)


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
    """Teacher targets from the cached top-k: full logits via expand_topk, and GI class
    weights (the prior's row for each label) when a prior is given."""

    def __init__(self, num_classes: int, class_prior, device: torch.device):
        self.num_classes = num_classes
        self.prior = None if class_prior is None else torch.as_tensor(class_prior).to(device)
        self.device = device

    def __call__(self, batch: dict, images: torch.Tensor) -> tuple:
        to_device = lambda key: batch[key].to(self.device, non_blocking=True)  # noqa: E731
        teacher_logits = expand_topk(to_device("topk_logits"), to_device("topk_classes"),
                                     to_device("logsumexp"), self.num_classes)  # (B, C)
        weights = None if self.prior is None else self.prior[to_device("labels")]  # (B, C)
        return teacher_logits, weights


class OnlineTeacher:
    """Teacher targets from running the (frozen) teacher on the student's own crops: the
    comparison the cache is measured against. Sample-wise IKL weights only (no prior)."""

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher.eval().requires_grad_(False)  # frozen once

    @torch.no_grad()
    def __call__(self, batch: dict, images: torch.Tensor) -> tuple:
        cuda = images.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            return self.teacher(images).float(), None


def _new_model(settings: TrainParams, manifest: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the same initial weights on every run and rank
    model = build_model(settings.arch, manifest["num_classes"], small_input=settings.small_input)
    if settings.weights:
        load_weights(model, settings.weights, reset_head=settings.reset_head)
    return model


def _run(params: Params, settings: TrainParams, manifest: dict, shards_dir: str,
         objective: DistillationObjective, *, store: LogitStore | None,
         teacher_targets=None, teacher_identity: dict | None = None,
         description: str) -> TrainRun:
    train_shards = split_shards(shards_dir, manifest, "train")
    val_split = "val" if "val" in manifest["splits"] else "test"
    val_shards = split_shards(shards_dir, manifest, val_split)
    is_student = isinstance(settings, StudentParams)
    views_per_decode = settings.views_per_decode if is_student else 1
    ranks = distributed()
    pin = ranks.device.type == "cuda"

    def train_batches(epoch: int):
        views = ViewSource(params.seed, epoch, views_per_decode, crop_spec(params.augment),
                           store, cached_views=params.logits.views if is_student else 0)
        return train_loader(train_shards, views, batch_size=settings.batch_size,
                            image_size=settings.image_size, workers=settings.workers,
                            rank=ranks.rank, world_size=ranks.world_size, pin_memory=pin)

    def val_batches():
        return eval_loader(val_shards, batch_size=params.evaluate.batch_size,
                           image_size=settings.image_size, workers=settings.workers,
                           rank=ranks.rank, world_size=ranks.world_size, pin_memory=pin)

    steps_per_epoch = epoch_steps(manifest["splits"]["train"]["rows"], views_per_decode,
                                  settings.batch_size, ranks.world_size)
    identity = model_identity(settings, params, manifest)
    if is_student:  # what the student learns from: a checkpoint resumes only if it is unchanged
        identity["targets"] = teacher_identity
    return TrainRun(settings, objective, train_batches, val_batches,
                    steps_per_epoch=steps_per_epoch, identity=identity,
                    teacher_targets=teacher_targets, description=description)
