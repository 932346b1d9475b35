"""The params schema: `params.yaml` parsed once into frozen dataclasses, validated once.

Every field below is a key of `params.yaml`. Unknown keys, wrong types and out-of-range values
fail before any work, with one line naming the key path, e.g.
`student.ikl.alpha: expected a number >= 0, got 'x'`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline.errors import UserError


class ParamsError(UserError):
    """A bad value in params.yaml; the message names the key path."""


# ---------------------------------------------------------------------------------------------
# Field helpers: a rule pairs the description of a good value with a test for it.

Rule = tuple[str, Callable[[Any], bool]]  # (what a good value is, test for it)


def _param(default: Any, rule: Rule | None = None) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: typing.cast(Any, default).copy(),
                     metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


def at_least(low: float) -> Rule:
    return f">= {low:g}", lambda value: value >= low


def above(low: float) -> Rule:
    return f"> {low:g}", lambda value: value > low


def between(low: float, high: float) -> Rule:
    return f"in [{low:g}, {high:g}]", lambda value: low <= value <= high


def one_of(*choices: str) -> Rule:
    return "one of " + ", ".join(choices), lambda value: value in choices


# ---------------------------------------------------------------------------------------------
# Sections

DATA_SOURCES = ("digits_lt", "split_lists", "cifar10_lt", "cifar100_lt", "image_folder",
                "glyphs_lt")


@dataclass(frozen=True)
class DataParams:
    """`data`: which source becomes WebDataset shards, and how."""

    source: str = _param("digits_lt", one_of(*DATA_SOURCES))
    root: str = ""  # split_lists, cifar*_lt (folder or .tar.gz), image_folder
    train_list: str = ""  # split_lists: one `relative/path label` per line
    val_list: str = ""
    test_list: str = ""
    num_classes: int = _param(0, at_least(0))  # split_lists: 0 infers max train label + 1
    imbalance_ratio: float = _param(10.0, at_least(1.0))  # rho of n_i = n_max * rho^(-i/(C-1))
    image_size: int = _param(32, at_least(8))  # digits_lt, glyphs_lt: side of the RGB image
    val_per_class: int = _param(20, at_least(0))  # digits_lt, glyphs_lt, image_folder: balanced
    test_per_class: int = _param(50, at_least(1))
    max_side: int = _param(0, at_least(0))  # re-encode larger images to this side; 0 keeps bytes
    jpeg_quality: int = _param(90, between(1, 100))  # used only when re-encoding
    skip_bad_images: bool = False  # skip (and record) unreadable images instead of failing
    shard_size: int = _param(256, at_least(1))
    workers: int = _param(2, at_least(0))  # encoding processes; 0 encodes in this process


@dataclass(frozen=True)
class TrainParams:
    """How one model trains: a teacher (`teachers.NAME`) or the student."""

    arch: str = "resnet18"  # a name from pipeline.train.models (unknown names list the known ones)
    small_input: bool = False  # 3x3 stem, no max-pool: for 32 px images
    image_size: int = _param(224, at_least(8))  # side of the crop the model sees
    epochs: int = _param(90, at_least(0))  # 0: use `weights` as they are (evaluate, dump)
    # The global batch over all ranks (the paper's -b 128 on 4 GPUs): each of W ranks takes
    # batch_size / W, so the same params train the same way on any number of GPUs.
    batch_size: int = _param(128, at_least(1))
    drop_last: bool = True  # drop each epoch's short last batch, as the paper's DataLoader
    lr: float = _param(0.05, above(0))
    momentum: float = _param(0.9, between(0, 1))
    weight_decay: float = _param(5e-4, at_least(0))
    warmup_epochs: int = _param(0, at_least(0))  # linear warm-up, then cosine
    # per_step: warm-up and cosine to zero over steps; per_epoch: the official DKL form, lr
    # set once per epoch, (e + 1) / warmup_epochs in warm-up, then
    # 0.5 * (1 + cos(pi * (e - warmup_epochs + 1) / (epochs - warmup_epochs + 1))).
    schedule: str = _param("per_step", one_of("per_step", "per_epoch"))
    precision: str = _param("bf16", one_of("bf16", "fp32"))  # autocast on CUDA; CPU is fp32
    workers: int = _param(2, at_least(0))  # DataLoader processes
    # Start from a weights file (torchvision / timm / this project's checkpoint; keep it under
    # weights/, which DVC tracks); "" trains from random initialisation.
    weights: str = ""
    reset_head: bool = False  # re-initialise a head trained for another number of classes
    # Seeds this model's initial weights and row order; null: the global `seed`. The data and
    # the views stay those of the global seed (a teacher seed leaves the prepared shards alone).
    seed: int | None = _param(None, at_least(0))


@dataclass(frozen=True)
class AugmentParams:
    """`augment`: the training crops, for teachers, the logit dump and students alike (the
    student replays exactly the crops its teacher's logits were computed on)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # and aspect ratio (width / height) range
    flip_probability: float = _param(0.5, between(0, 1))


@dataclass(frozen=True)
class LogitsParams:
    """`logits`: what stage one caches for every train row."""

    views: int = _param(8, at_least(1))  # V seeded views per row
    topk: int = _param(5, at_least(1))  # k logits kept exactly per view (k = C: all of them)
    # none: the top-k only (smallest; right for KL-KD, IKL needs the tail); quantized: every
    # other class's logit too, within about 0.03 logit, as int8 PCA coefficients and int16
    # residuals (pipeline/store/tail.py)
    tail: str = _param("quantized", one_of("none", "quantized"))
    image_size: int = _param(224, at_least(8))  # the teacher's input side
    batch_size: int = _param(256, at_least(1))
    prior_temperatures: tuple[float, ...] = (1.0,)  # class priors (IKL's GI) to store


@dataclass(frozen=True)
class KLParams:
    temperature: float = _param(1.0, above(0))
    weight: float = _param(1.0, at_least(0))


@dataclass(frozen=True)
class IKLParams:
    alpha: float = _param(1.0, at_least(0))  # soft-label CE weight
    beta: float = _param(1.0, at_least(0))  # weighted MSE of pairwise logit differences
    temperature: float = _param(1.0, above(0))
    weight_temperature: float = _param(100.0, above(0))  # T2 of softmax(teacher / T2) weights
    weights: str = _param("sample", one_of("sample", "class_prior"))  # class_prior = GI
    gamma: float = _param(1.0, above(0))
    # train IKL on a top-k-only store (logits.tail: none, k < C) anyway, with the classes
    # outside the top-k filled evenly: a different loss than the paper's (README, "Top-k and IKL")
    approximate_tail: bool = False
    normalize: bool = False  # divide wMSE by the batch's sum(w w^T): the generalised (GKL) form
    # Where GI's class prior comes from: `store` (exact, all cached views, from the first step)
    # or `previous_epoch` (the official --GI: the teacher's mean softmax(t / T2) per label over
    # the crops of the previous epoch, all ranks; uniform 1/C in epoch 0).
    prior: str = _param("store", one_of("store", "previous_epoch"))


@dataclass(frozen=True)
class StudentParams(TrainParams):
    """`student`: a TrainParams plus where its teacher logits come from and the loss."""

    teacher: str = "teacher"  # a key of `teachers`: whose logit store to train against
    # Seeds the student's initial weights and shuffle order; null: the global `seed`. The
    # cached views stay those of the global seed (the store holds them).
    seed: int | None = _param(None, at_least(0))
    loss: str = _param("ikl", one_of("ce", "kl", "ikl"))
    ce_weight: float = _param(1.0, at_least(0))  # weight of CE on the label
    kl: KLParams = field(default_factory=KLParams)
    ikl: IKLParams = field(default_factory=IKLParams)
    views_per_decode: int = _param(1, at_least(1))  # m views of each decoded image per step
    online_teacher: bool = False  # run the teacher live instead of reading the cache
    # Where the student's images (and its teacher's dump) are decoded: `cpu` in the DataLoader
    # workers (Pillow, JPEG draft scales), `gpu` on the training device (nvJPEG on CUDA; the
    # same code on the CPU without one), `auto`: the store's path when replaying one, else cpu,
    # on CUDA too until the gpu path is measured there (pipeline/stream/device_decode.py).
    decode: str = _param("auto", one_of("auto", "cpu", "gpu"))


@dataclass(frozen=True)
class EvaluateParams:
    """`evaluate`: long-tail groups by train count: many > many_above >= medium >= few_below
    > few."""

    many_above: int = _param(100, at_least(0))
    few_below: int = _param(20, at_least(0))
    batch_size: int = _param(256, at_least(1))  # per process: inference, no effect on results
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
    devices: int | None = _param(None, at_least(1))


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml."""

    seed: int = _param(0, at_least(0))
    data: DataParams = field(default_factory=DataParams)
    teachers: dict[str, TrainParams] = field(
        default_factory=lambda: {"teacher": TrainParams()})
    augment: AugmentParams = field(default_factory=AugmentParams)
    logits: LogitsParams = field(default_factory=LogitsParams)
    student: StudentParams = field(default_factory=StudentParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)


# ---------------------------------------------------------------------------------------------
# Parsing

def load_params(path: str | Path) -> Params:
    """Read and validate params.yaml; raises ParamsError naming the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found; pass --params with its path")
    try:
        with path.open(encoding="utf-8") as stream:
            raw = yaml.safe_load(stream) or {}
    except yaml.YAMLError as error:  # a syntax error, or a tag safe_load refuses
        raise ParamsError(f"{path}: {_yaml_problem(error)}") from None
    except UnicodeDecodeError as error:
        raise ParamsError(f"{path}: not UTF-8 text (byte {error.start})") from None
    params = check_consistency(parse(Params, raw, ""))
    check_architectures(params)
    return params


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: where and what, from PyYAML's multi-line message."""
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if isinstance(error, yaml.constructor.ConstructorError):
        return (f"{where}{problem}; params.yaml holds plain values only (no YAML tags such as "
                "!!python/...)")
    return f"{where}not valid YAML ({problem})"


def check_architectures(params: Params) -> None:
    """Every `arch` names a model pipeline.train.models builds: a typo fails here, before prepare,
    not after it. (Imports torchvision, so it runs in load_params, not in parse.)"""
    from pipeline.train.models import unknown_architecture

    archs = {f"teachers.{name}.arch": t.arch for name, t in params.teachers.items()}
    archs["student.arch"] = params.student.arch
    for key, arch in archs.items():
        problem = unknown_architecture(arch)
        if problem:
            raise ParamsError(f"{key}: {problem}")


def check_consistency(params: Params) -> Params:
    """Checks that involve more than one key."""
    if params.student.teacher not in params.teachers:
        raise ParamsError(f"student.teacher: {params.student.teacher!r} is not a key of "
                          f"teachers (known: {', '.join(params.teachers)})")
    for key, (low, high) in (("crop_scale", params.augment.crop_scale),
                             ("crop_ratio", params.augment.crop_ratio)):
        if not 0 < low <= high:
            raise ParamsError(f"augment.{key}: expected [low, high] with 0 < low <= high, "
                              f"got {[low, high]}")
    if params.evaluate.few_below > params.evaluate.many_above:
        raise ParamsError("evaluate.few_below: expected <= evaluate.many_above, got "
                          f"{params.evaluate.few_below} > {params.evaluate.many_above}")
    ikl = params.student.ikl
    store_prior = ikl.weights == "class_prior" and ikl.prior == "store"
    if (params.student.loss == "ikl" and store_prior
            and ikl.weight_temperature not in params.logits.prior_temperatures):
        raise ParamsError(f"student.ikl.weight_temperature: {ikl.weight_temperature:g} has no "
                          "stored class prior; add it to logits.prior_temperatures")
    for key_path, model in [*((f"teachers.{name}", settings)
                              for name, settings in params.teachers.items()),
                            ("student", params.student)]:
        _check_weights(key_path, model)
    student = params.student
    if student.online_teacher and student.loss == "ikl" and store_prior:
        raise ParamsError("student.online_teacher: the live teacher has no stored GI prior; set "
                          "student.ikl.prior: previous_epoch, student.ikl.weights: sample or "
                          "online_teacher: false")
    _check_objective_weights(student)
    num_classes = SOURCE_CLASSES.get(params.data.source, params.data.num_classes
                                     if params.data.source == "split_lists" else 0)
    if num_classes and params.logits.topk > num_classes:
        raise ParamsError(f"logits.topk: {params.logits.topk} exceeds the {num_classes} "
                          f"classes of data.source {params.data.source}; set logits.topk <= "
                          f"{num_classes}")
    # Known before any dump (the student's stage checks the store itself when C is unknown).
    if (student.loss == "ikl" and params.logits.tail == "none" and num_classes
            and params.logits.topk < num_classes and not student.ikl.approximate_tail
            and not student.online_teacher):
        raise ParamsError(
            f"logits.tail: none keeps only the top-{params.logits.topk} of {num_classes} "
            "logits, but an IKL student needs every class's logit; set logits.tail: quantized, "
            "or student.ikl.approximate_tail: true to train on the evenly filled tail anyway")
    if student.views_per_decode > params.logits.views:
        raise ParamsError(f"student.views_per_decode: {student.views_per_decode} exceeds the "
                          f"{params.logits.views} cached views (logits.views); the extra crops "
                          "would repeat")
    return params


# Class counts fixed by the source (others: data.num_classes, or known after prepare).
SOURCE_CLASSES = {"digits_lt": 10, "cifar10_lt": 10, "cifar100_lt": 100, "glyphs_lt": 100}


def _check_objective_weights(student: StudentParams) -> None:
    """Refuse an objective whose every weight is 0: its loss is constantly 0 and the student
    would train on nothing (val top-1 at chance) without a word."""
    weights = {"ce": {"student.ce_weight": student.ce_weight},
               "kl": {"student.ce_weight": student.ce_weight,
                      "student.kl.weight": student.kl.weight},
               "ikl": {"student.ce_weight": student.ce_weight,
                       "student.ikl.alpha": student.ikl.alpha,
                       "student.ikl.beta": student.ikl.beta}}.get(student.loss)
    if weights and not any(weights.values()):
        raise ParamsError(f"{', '.join(weights)}: all 0 with student.loss: {student.loss}; "
                          "the loss would be constantly 0 and the student would learn nothing: "
                          "set at least one above 0")


def _check_weights(key_path: str, settings: TrainParams) -> None:
    if settings.epochs == 0 and not settings.weights:
        raise ParamsError(f"{key_path}.epochs: 0 uses the weights file as it is, but "
                          f"{key_path}.weights is empty; name a file or train (epochs >= 1)")
    if settings.reset_head and not settings.weights:
        raise ParamsError(f"{key_path}.reset_head: true needs {key_path}.weights (a model "
                          "without weights already has a fresh head)")
    if settings.reset_head and settings.epochs == 0:
        raise ParamsError(f"{key_path}.reset_head: a re-initialised head needs training; set "
                          f"{key_path}.epochs >= 1")


def parse(cls: type, raw: Any, key_path: str) -> Any:
    """Build dataclass `cls` from a plain mapping, checking keys, types and ranges."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{key_path or 'params'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{key_path}.{unknown[0]}" if key_path else unknown[0]
        raise ParamsError(f"{where}: unknown key (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        child_path = f"{key_path}.{name}" if key_path else name
        hint, rule = hints[name], fields[name].metadata.get("rule")
        optional = _optional_of(hint)
        if optional is not None:  # `int | None`: null keeps None, anything else is an int
            if value is None:
                values[name] = None
                continue
            hint = optional
        if hint in (bool, int, float, str):
            values[name] = _scalar(hint, value)
            if values[name] is None or (rule and not rule[1](values[name])):
                # a string's rule names its choices; a number's qualifies it (">= 0")
                wanted = (rule[0] if hint is str else f"{_describe(hint)} {rule[0]}"
                          ) if rule else _describe(hint)
                raise ParamsError(f"{child_path}: expected {wanted}, got {value!r}")
        else:
            values[name] = _convert(hint, value, child_path)
    return cls(**values)


def _convert(hint: Any, value: Any, key_path: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, key_path)
    if origin is dict:
        _, value_hint = typing.get_args(hint)
        if not isinstance(value, dict) or not value:
            raise ParamsError(f"{key_path}: expected a non-empty mapping, got {value!r}")
        return {str(k): _convert(value_hint, v, f"{key_path}.{k}") for k, v in value.items()}
    if origin is tuple:
        item_hints = typing.get_args(hint)
        if item_hints[-1] is Ellipsis:  # tuple[float, ...]: any length but empty
            item_hints = item_hints[:1] * len(value) if isinstance(value, (list, tuple)) else ()
        if not isinstance(value, (list, tuple)) or not value or len(value) != len(item_hints):
            count = len(item_hints) or "some"
            raise ParamsError(f"{key_path}: expected a list of {count} numbers, got {value!r}")
        return tuple(_convert(h, v, key_path) for h, v in zip(item_hints, value))
    if hint in (bool, int, float, str):
        converted = _scalar(hint, value)
        if converted is None:
            raise ParamsError(f"{key_path}: expected {_describe(hint)}, got {value!r}")
        return converted
    raise TypeError(f"{key_path}: unsupported params type {hint}")  # a schema bug, not user's


def _optional_of(hint: Any) -> Any:
    """X for a hint `X | None`, else None."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and len(args) == 2 and type(None) in args:
        return next(arg for arg in args if arg is not type(None))
    return None


def _scalar(hint: type, value: Any) -> Any:
    """`value` as type `hint`, or None when it is not one (ints are accepted as floats)."""
    if hint is bool:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if hint is float and isinstance(value, (int, float)):
        return float(value)
    return value if isinstance(value, hint) else None


def _describe(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}[hint]


def to_dict(params: Any) -> dict:
    """Plain-data form of a params dataclass (for checkpoints and store attributes)."""
    return dataclasses.asdict(params)
