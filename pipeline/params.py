"""The params schema: `params.yaml` parsed once into frozen dataclasses, validated once.

Every field below is a key of `params.yaml`. Unknown keys, wrong types and out-of-range values
fail before any work, with one line naming the key path, e.g.
`student.ikl.alpha: expected a number >= 0, got 'x'`. Reading the file is
pipeline/params_yaml.py, turning its data into these dataclasses pipeline/params_parse.py; here
are the sections and the checks that involve more than one key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.registry import DATA_SOURCES, known_classes
# ParamsError and parse are also imported from here by the stages, the train package and tests.
from pipeline.params_parse import (ParamsError, Rule, above, at_least, between, one_of, param,
                                   parse, parse_into)
from pipeline.params_yaml import read_yaml


# ---------------------------------------------------------------------------------------------
# Sections

# A crop range [low, high] (augment.crop_scale, crop_ratio): the one check of it, here and in
# pipeline.stream.augment.CropSpec.
CROP_RANGE: Rule = ("[low, high] with 0 < low <= high",
                    lambda value: len(value) == 2 and 0 < value[0] <= value[1])


@dataclass(frozen=True)
class DataParams:
    """`data`: which source becomes WebDataset shards, and how."""

    source: str = param("digits_lt", one_of(*DATA_SOURCES))
    root: str = ""  # split_lists, cifar*_lt (folder or .tar.gz), image_folder
    train_list: str = ""  # split_lists: one `relative/path label` per line
    val_list: str = ""
    test_list: str = ""
    num_classes: int = param(0, at_least(0))  # split_lists: 0 infers max train label + 1
    imbalance_ratio: float = param(10.0, at_least(1.0))  # rho of n_i = n_max * rho^(-i/(C-1))
    image_size: int = param(32, at_least(8))  # digits_lt, glyphs_lt: side of the RGB image
    val_per_class: int = param(20, at_least(0))  # digits_lt, glyphs_lt, image_folder: balanced
    test_per_class: int = param(50, at_least(1))
    max_side: int = param(0, at_least(0))  # re-encode larger images to this side; 0 keeps bytes
    jpeg_quality: int = param(90, between(1, 100))  # used only when re-encoding
    skip_bad_images: bool = False  # skip (and record) unreadable images instead of failing
    shard_size: int = param(256, at_least(1))
    workers: int = param(2, at_least(0))  # encoding processes; 0 encodes in this process


@dataclass(frozen=True)
class TrainParams:
    """How one model trains: a teacher (`teachers.NAME`) or the student."""

    arch: str = "resnet18"  # a name from pipeline.train.models (unknown names list the known ones)
    small_input: bool = False  # 3x3 stem, no max-pool: for 32 px images
    image_size: int = param(224, at_least(8))  # side of the crop the model sees
    epochs: int = param(90, at_least(0))  # 0: use `weights` as they are (evaluate, dump)
    # The global batch over all ranks (the paper's -b 128 on 4 GPUs): each of W ranks takes
    # batch_size / W, so the same params train the same way on any number of GPUs.
    batch_size: int = param(128, at_least(1))
    drop_last: bool = True  # drop each epoch's short last batch, as the paper's DataLoader
    lr: float = param(0.05, above(0))
    momentum: float = param(0.9, between(0, 1))
    weight_decay: float = param(5e-4, at_least(0))
    warmup_epochs: int = param(0, at_least(0))  # linear warm-up, then cosine
    # per_step: warm-up and cosine to zero over steps; per_epoch: the official DKL form, lr
    # set once per epoch, (e + 1) / warmup_epochs in warm-up, then
    # 0.5 * (1 + cos(pi * (e - warmup_epochs + 1) / (epochs - warmup_epochs + 1))).
    schedule: str = param("per_step", one_of("per_step", "per_epoch"))
    precision: str = param("bf16", one_of("bf16", "fp32"))  # autocast on CUDA; CPU is fp32
    workers: int = param(2, at_least(0))  # DataLoader processes
    # Start from a weights file (torchvision / timm / this project's checkpoint; keep it under
    # weights/, which DVC tracks); "" trains from random initialisation.
    weights: str = ""
    reset_head: bool = False  # re-initialise a head trained for another number of classes
    # Seeds this model's initial weights and row order; null: the global `seed`. The data and
    # the views stay those of the global seed (a teacher seed leaves the prepared shards alone).
    seed: int | None = param(None, at_least(0))


@dataclass(frozen=True)
class AugmentParams:
    """`augment`: the training crops, for teachers, the logit dump and students alike (the
    student replays exactly the crops its teacher's logits were computed on)."""

    # RandomResizedCrop's ranges: the crop's area as a fraction of the image's, and its aspect
    # ratio (width / height)
    crop_scale: tuple[float, float] = param((0.08, 1.0), CROP_RANGE)
    crop_ratio: tuple[float, float] = param((3 / 4, 4 / 3), CROP_RANGE)
    flip_probability: float = param(0.5, between(0, 1))


@dataclass(frozen=True)
class LogitsParams:
    """`logits`: what stage one caches for every train row."""

    views: int = param(8, at_least(1))  # V seeded views per row
    topk: int = param(5, at_least(1))  # k logits kept exactly per view (k = C: all of them)
    # none: the top-k only (smallest; right for KL-KD, IKL needs the tail); quantized: every
    # other class's logit too, within about 0.03 logit, as int8 PCA coefficients and int16
    # residuals (pipeline/store/tail.py)
    tail: str = param("quantized", one_of("none", "quantized"))
    image_size: int = param(224, at_least(8))  # the teacher's input side
    batch_size: int = param(256, at_least(1))
    prior_temperatures: tuple[float, ...] = (1.0,)  # class priors (IKL's GI) to store


@dataclass(frozen=True)
class KLParams:
    temperature: float = param(1.0, above(0))
    weight: float = param(1.0, at_least(0))


@dataclass(frozen=True)
class IKLParams:
    alpha: float = param(1.0, at_least(0))  # soft-label CE weight
    beta: float = param(1.0, at_least(0))  # weighted MSE of pairwise logit differences
    temperature: float = param(1.0, above(0))
    weight_temperature: float = param(100.0, above(0))  # T2 of softmax(teacher / T2) weights
    weights: str = param("sample", one_of("sample", "class_prior"))  # class_prior = GI
    gamma: float = param(1.0, above(0))
    # train IKL on a top-k-only store (logits.tail: none, k < C) anyway, with the classes
    # outside the top-k filled evenly: a different loss than the paper's (README, "Top-k and IKL")
    approximate_tail: bool = False
    normalize: bool = False  # divide wMSE by the batch's sum(w w^T): the generalised (GKL) form
    # Where GI's class prior comes from: `store` (exact, all cached views, from the first step)
    # or `previous_epoch` (the official --GI: the teacher's mean softmax(t / T2) per label over
    # the crops of the previous epoch, all ranks; uniform 1/C in epoch 0).
    prior: str = param("store", one_of("store", "previous_epoch"))


@dataclass(frozen=True)
class StudentParams(TrainParams):
    """`student`: a TrainParams plus where its teacher logits come from and the loss."""

    teacher: str = "teacher"  # a key of `teachers`: whose logit store to train against
    # Seeds the student's initial weights and shuffle order; null: the global `seed`. The
    # cached views stay those of the global seed (the store holds them).
    seed: int | None = param(None, at_least(0))
    loss: str = param("ikl", one_of("ce", "kl", "ikl"))
    ce_weight: float = param(1.0, at_least(0))  # weight of CE on the label
    kl: KLParams = field(default_factory=KLParams)
    ikl: IKLParams = field(default_factory=IKLParams)
    views_per_decode: int = param(1, at_least(1))  # m views of each decoded image per step
    online_teacher: bool = False  # run the teacher live instead of reading the cache
    # Where the student's images (and its teacher's dump) are decoded: `cpu` in the DataLoader
    # workers (Pillow, JPEG draft scales), `gpu` on the training device (nvJPEG on CUDA; the
    # same code on the CPU without one), `auto`: the store's path when replaying one, else cpu,
    # on CUDA too until the gpu path is measured there (pipeline/stream/device_decode.py).
    decode: str = param("auto", one_of("auto", "cpu", "gpu"))


@dataclass(frozen=True)
class EvaluateParams:
    """`evaluate`: long-tail groups by train count: many > many_above >= medium >= few_below
    > few."""

    many_above: int = param(100, at_least(0))
    few_below: int = param(20, at_least(0))
    batch_size: int = param(256, at_least(1))  # per process: inference, no effect on results
    # Also log test top-1 after every training epoch (`test/top1`): the official script's
    # protocol (it keeps the best test epoch); the reported result stays the final model's.
    every_epoch_on_test: bool = False


@dataclass(frozen=True)
class RuntimeParams:
    """`runtime`: how a run uses this machine, not what it computes. No stage lists it in
    dvc.yaml, so changing it reruns nothing: batch sizes are global, and the same params train
    the same way on any number of processes (up to per-process BatchNorm statistics and the
    order of float reductions)."""

    # processes a stage started outside torchrun runs on this machine (pipeline.launch):
    # null = one per visible GPU (one process on a CPU-only machine); N = N processes (N GPUs,
    # or N gloo processes on a CPU)
    devices: int | None = param(None, at_least(1))


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml."""

    seed: int = param(0, at_least(0))
    data: DataParams = field(default_factory=DataParams)
    teachers: dict[str, TrainParams] = field(
        default_factory=lambda: {"teacher": TrainParams()})
    augment: AugmentParams = field(default_factory=AugmentParams)
    logits: LogitsParams = field(default_factory=LogitsParams)
    student: StudentParams = field(default_factory=StudentParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)


# ---------------------------------------------------------------------------------------------
# Reading and checking

def load_params(path: str | Path) -> Params:
    """Read and validate params.yaml; raises ParamsError naming every bad key at once."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found; pass --params with its path")
    raw, problems = read_yaml(path)
    problems = [f"{path}: {problem}" for problem in problems]
    bad_keys: list[str] = []
    params = parse_into(Params, {} if raw is None else raw, "", bad_keys)
    problems += bad_keys
    bad_paths = [problem.split(":", 1)[0] for problem in bad_keys]
    # A key refused above falls back to its default: checks that read it would be noise.
    problems += [problem for problem in consistency_problems(params) + architecture_problems(
        params) if not any(_touches(problem, key) for key in bad_paths)]
    if problems:
        raise ParamsError(problems, path)
    return params


def _touches(problem: str, key_path: str) -> bool:
    keys = problem.split(":", 1)[0].split(", ")
    return any(key == key_path or key.startswith(key_path + ".")
               or key_path.startswith(key + ".") for key in keys)


def architecture_problems(params: Params) -> list[str]:
    """Every `arch` names a model pipeline.train.models builds: a typo fails here, before
    prepare, not after it. (Imports torchvision, so it runs in load_params, not in parse.)"""
    from pipeline.train.models import unknown_architecture

    archs = {f"teachers.{name}.arch": t.arch for name, t in params.teachers.items()}
    archs["student.arch"] = params.student.arch
    return [f"{key}: {problem}" for key, arch in archs.items()
            if (problem := unknown_architecture(arch))]


def check_consistency(params: Params) -> Params:
    """Checks that involve more than one key; raises ParamsError listing every problem."""
    problems = consistency_problems(params)
    if problems:
        raise ParamsError(problems)
    return params


def consistency_problems(params: Params) -> list[str]:
    """Every problem between keys, one line each."""
    problems = []
    if params.student.teacher not in params.teachers:
        problems.append(f"student.teacher: {params.student.teacher!r} is not a key of "
                        f"teachers (known: {', '.join(params.teachers)})")
    if params.evaluate.few_below > params.evaluate.many_above:
        problems.append("evaluate.few_below: expected <= evaluate.many_above, got "
                        f"{params.evaluate.few_below} > {params.evaluate.many_above}")
    ikl = params.student.ikl
    store_prior = ikl.weights == "class_prior" and ikl.prior == "store"
    if (params.student.loss == "ikl" and store_prior
            and ikl.weight_temperature not in params.logits.prior_temperatures):
        problems.append(f"student.ikl.weight_temperature: {ikl.weight_temperature:g} has no "
                        "stored class prior; add it to logits.prior_temperatures")
    for key_path, model in [*((f"teachers.{name}", settings)
                              for name, settings in params.teachers.items()),
                            ("student", params.student)]:
        problems += _weights_problems(key_path, model)
    student = params.student
    if student.online_teacher and student.loss == "ikl" and store_prior:
        problems.append("student.online_teacher: the live teacher has no stored GI prior; set "
                        "student.ikl.prior: previous_epoch, student.ikl.weights: sample or "
                        "online_teacher: false")
    problems += _objective_problems(student)
    num_classes = known_classes(params.data.source, params.data.num_classes)
    if num_classes:  # else known after prepare: `data_problems`
        problems += _class_problems(params, num_classes, f"data.source {params.data.source}")
    if student.views_per_decode > params.logits.views:
        problems.append(f"student.views_per_decode: {student.views_per_decode} exceeds the "
                        f"{params.logits.views} cached views (logits.views); the extra crops "
                        "would repeat")
    return problems


def topk_problems(logits: LogitsParams, num_classes: int, source: str) -> list[str]:
    """`logits.topk` against the `num_classes` classes of `source` (the data source, or the
    prepared shards where only they know C): the one check of k <= C, made by load_params, the
    teacher run (`data_problems`) and the dump. (A store's attributes, which any writer may
    have made, are checked on open: pipeline/store/layout.py.)"""
    if logits.topk > num_classes:
        return [f"logits.topk: {logits.topk} exceeds the {num_classes} classes of {source}; "
                f"set logits.topk <= {num_classes}"]
    return []


def _class_problems(params: Params, num_classes: int, source: str) -> list[str]:
    logits, student = params.logits, params.student
    problems = topk_problems(logits, num_classes, source)
    if not problems and (student.loss == "ikl" and logits.tail == "none"
                         and logits.topk < num_classes and not student.ikl.approximate_tail
                         and not student.online_teacher):
        problems.append(
            f"logits.tail: none keeps only the top-{logits.topk} of {num_classes} "
            "logits, but an IKL student needs every class's logit; set logits.tail: quantized, "
            "or student.ikl.approximate_tail: true to train on the evenly filled tail anyway")
    return problems


def data_problems(params: Params, manifest: dict, shards_dir: str) -> list[str]:
    """Every limit the prepared data set puts on the params, one line each: the class count
    (where the source does not fix it) and each trained model's batch against an epoch's
    samples under drop_last (a model with epochs: 0 trains nothing, so it has no such limit)."""
    problems = []
    if not DATA_SOURCES[params.data.source].num_classes:
        problems += _class_problems(params, manifest["num_classes"], shards_dir)
    rows = manifest["splits"]["train"]["rows"]
    models = {**{f"teachers.{name}": (t, 1) for name, t in params.teachers.items()},
              "student": (params.student, params.student.views_per_decode)}
    for key, (settings, views_per_decode) in models.items():
        samples = rows * views_per_decode
        if settings.epochs and settings.drop_last and settings.batch_size > samples:
            problems.append(f"{key}.batch_size: {settings.batch_size} is more than the "
                            f"{samples} training samples of an epoch of {shards_dir} and "
                            f"{key}.drop_last is set: no step would be taken; set it <= "
                            f"{samples} or drop_last: false")
    return problems


def check_against_data(params: Params, manifest: dict, shards_dir: str) -> None:
    """Raise ParamsError listing every `data_problems` at once."""
    problems = data_problems(params, manifest, shards_dir)
    if problems:
        raise ParamsError(problems)


def _objective_problems(student: StudentParams) -> list[str]:
    """Refuse an objective whose every weight is 0: its loss is constantly 0 and the student
    would train on nothing (val top-1 at chance) without a word."""
    weights = {"ce": {"student.ce_weight": student.ce_weight},
               "kl": {"student.ce_weight": student.ce_weight,
                      "student.kl.weight": student.kl.weight},
               "ikl": {"student.ce_weight": student.ce_weight,
                       "student.ikl.alpha": student.ikl.alpha,
                       "student.ikl.beta": student.ikl.beta}}.get(student.loss)
    if weights and not any(weights.values()):
        return [f"{', '.join(weights)}: all 0 with student.loss: {student.loss}; the loss "
                "would be constantly 0 and the student would learn nothing: set at least one "
                "above 0"]
    return []


def _weights_problems(key_path: str, settings: TrainParams) -> list[str]:
    problems = []
    if settings.epochs == 0 and not settings.weights:
        problems.append(f"{key_path}.epochs: 0 uses the weights file as it is, but "
                        f"{key_path}.weights is empty; name a file or train (epochs >= 1)")
    if settings.reset_head and not settings.weights:
        problems.append(f"{key_path}.reset_head: true needs {key_path}.weights (a model "
                        "without weights already has a fresh head)")
    if settings.reset_head and settings.epochs == 0:
        problems.append(f"{key_path}.reset_head: a re-initialised head needs training; set "
                        f"{key_path}.epochs >= 1")
    return problems


def to_dict(params: Any) -> dict:
    """Plain-data form of a params dataclass (for checkpoints and store attributes)."""
    return dataclasses.asdict(params)
