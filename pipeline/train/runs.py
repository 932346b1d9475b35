"""The two training runs, each set up top to bottom: a teacher (CE on fresh crops) and a
student (CE / KL-KD / IKL-KD against its teacher's logit store, or the live teacher). Both hand
the one loop (pipeline.train.loop.fit) a model and a TrainRun."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.stream.augment import DECODE, crop_spec
from pipeline.train.checkpoints import load_model
from pipeline.stream.device_decode import (check_replay_decode, decode_path, decode_summary,
                                    warn_if_decoded_elsewhere)
from pipeline.errors import UserError
from pipeline.train.losses import DistillationObjective
from pipeline.train.priors import PreviousEpochPrior
from pipeline.train.models import build_model, load_weights
from pipeline.params import Params, StudentParams, TrainParams, check_against_data, to_dict
from pipeline.data.manifest import file_sha256, load_manifest
from pipeline.store import (LOGIT_FIELDS, LogitStore, TailBasis, open_store,
                            teacher_logits_from_fields)
from pipeline.distributed import distributed
from pipeline.stream.views import CachedViews, FreshViews, StoredViews, Views
from pipeline.stream.loader import TrainStream, epoch_steps, eval_loader, split_shards
from pipeline.train.loop import TrainRun, fit

__all__ = ["train_teacher", "train_student", "crop_spec", "load_model", "model_identity",
           "CachedTeacher", "OnlineTeacher", "run_batches"]

# Store attributes that change what a student learns (its resume identity includes them).
STORE_IDENTITY = ("teacher_sha256", "fingerprint", "seed", "augmentation", "views", "topk",
                  "tail", "teacher_image_size", "decode")


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
    # Every limit the data set puts on any key, at once, before training (else the dump or the
    # student fails after it, one key per run).
    check_against_data(params, manifest, shards_dir)
    # Its own seed: initial weights and row order. Its crops are fresh views of the global
    # seed, past the ones a store caches: it never trains on the crops it later labels.
    seed = params.seed if settings.seed is None else settings.seed

    def views(epoch: int) -> Views:
        return FreshViews(params.seed, epoch, order_seed=seed, crop=crop_spec(params.augment))

    run = TrainRun(settings, DistillationObjective(),
                   identity=model_identity(settings, params, manifest), description=name,
                   **run_batches(params, settings, manifest, shards_dir, f"teachers.{name}",
                                 views))
    return fit(_new_model(settings, manifest, seed), run, out_dir, live_dir)


def train_student(params: Params, shards_dir: str, store_path: str, teacher_checkpoint: str,
                  out_dir: str, live_dir: str) -> dict:
    """Train the student against its teacher's logit store (or the live teacher when
    `student.online_teacher`)."""
    settings = params.student
    manifest = load_manifest(shards_dir)
    objective = DistillationObjective(settings)
    device = distributed().device
    # Its teacher: the store (or the live model) and what the checkpoint's identity records
    # of it; none for plain CE, which still draws the V views a store would hold.
    store, targets, teacher_identity = None, None, {"views": params.logits.views}
    if objective.needs_teacher and settings.online_teacher:
        teacher, _ = load_model(teacher_checkpoint)
        targets = OnlineTeacher(teacher.to(device), params.teachers[settings.teacher].precision)
        teacher_identity["online_teacher_sha256"] = file_sha256(teacher_checkpoint)
    elif objective.needs_teacher:
        store = open_store(store_path, fingerprint=manifest["fingerprint"], seed=params.seed,
                           teacher_sha256=file_sha256(teacher_checkpoint))
        check_store_serves(store, settings)
        # GI prior: the store's (exact, from the first step) unless the previous epoch's.
        prior = (store.class_prior(settings.ikl.weight_temperature)
                 if objective.needs_class_prior and settings.ikl.prior == "store" else None)
        targets = CachedTeacher(manifest["num_classes"], prior, device, store.tail_basis)
        teacher_identity = {key: store.attributes.get(key) for key in STORE_IDENTITY}
    class_prior = (PreviousEpochPrior(manifest["num_classes"], device=device,
                                      weight_temperature=settings.ikl.weight_temperature)
                   if objective.needs_class_prior and settings.ikl.prior == "previous_epoch"
                   else None)
    decode = student_decode_path(settings, device, store)
    if distributed().is_main:
        print("student: " + decode_summary(decode, settings.decode, device,
                                           follows_store=store is not None), flush=True)
    # Its own seed: initial weights and row order; its views stay the store's (global seed).
    seed = params.seed if settings.seed is None else settings.seed
    m = settings.views_per_decode  # crops of each decoded image per step

    def views(epoch: int) -> Views:
        if store is not None:
            return StoredViews(store, epoch, order_seed=seed, views_per_decode=m)
        return CachedViews(params.seed, epoch, order_seed=seed, views=params.logits.views,
                           views_per_decode=m, crop=crop_spec(params.augment))

    # A checkpoint resumes only if what the student learns from is unchanged.
    identity = {**model_identity(settings, params, manifest), "targets": teacher_identity}
    run = TrainRun(settings, objective, identity=identity, teacher_targets=targets,
                   class_prior=class_prior, description="student",
                   **run_batches(params, settings, manifest, shards_dir, "student", views,
                                 settings.views_per_decode, decode))
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


def run_batches(params: Params, settings: TrainParams, manifest: dict, shards_dir: str,
                key: str, views, views_per_decode: int = 1, decode: str = DECODE) -> dict:
    """TrainRun's data: `train_batches` (epoch -> this rank's batches of the crops
    `views(epoch)` names), `val_batches`, `test_batches` (with evaluate.every_epoch_on_test)
    and `steps_per_epoch`; refuses a batch that leaves an epoch without a step."""
    ranks = distributed()
    pin = ranks.device.type == "cuda"
    batch_size = rank_batch_size(settings.batch_size, ranks.world_size, key)
    train_shards = split_shards(shards_dir, manifest, "train")

    # One stream per run: its workers start once and serve every epoch.
    stream = TrainStream(train_shards, views(0), batch_size=batch_size,
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
    if steps_per_epoch == 0 and settings.epochs:  # epochs 0 trains nothing
        raise UserError(f"{key}.batch_size: {settings.batch_size} is more than the "
                        f"{rows * views_per_decode} training samples of an epoch and "
                        "drop_last is set: no step would be taken; lower it")
    val_split = "val" if "val" in manifest["splits"] else "test"
    return {"train_batches": train_batches, "val_batches": eval_batches(val_split),
            "test_batches": eval_batches("test") if params.evaluate.every_epoch_on_test else None,
            "steps_per_epoch": steps_per_epoch}
