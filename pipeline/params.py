"""The params schema: `params.yaml` parsed once into frozen dataclasses, validated once.

Every field below is a key of `params.yaml`. Unknown keys, wrong types and out-of-range values
fail before any work, with one line naming the key path, e.g.
`student.ikl.alpha: expected a number >= 0, got 'x'`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline.errors import UserError


class ParamsError(UserError):
    """Bad values in params.yaml: one line per problem, each naming its key path."""

    def __init__(self, problems: str | list[str], path: str | Path | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:  # every problem at once, so a small data set is not fixed one run at a time
            where = f"{path}: " if path else ""
            message = (f"{where}{len(self.problems)} problems in the params; fix them all, then "
                       "rerun:\n"
                       + "\n".join(f"  {problem.removeprefix(where)}"
                                    for problem in self.problems))
        super().__init__(message)


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
# Reading the YAML: numbers as YAML 1.2 reads them (what `dvc exp run -S` writes), every
# duplicated key and alias named

class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema numbers: `1e-05` and `1e-3` are floats
    (YAML 1.1 needs a dot; DVC writes `-S lr=0.00001` as `1e-05`) and `010` is 10, not octal 8.
    Duplicate keys and aliases are collected in `problems` instead of passing silently."""

    def __init__(self, stream):
        super().__init__(stream)
        self.problems: list[str] = []

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            # dvc#10984: `dvc exp run -S` sets one key and silently de-links the others
            self.problems.append(
                f"{_where(event.start_mark)}alias *{event.anchor}: `dvc exp run -S` changes "
                "only the key it names and silently de-links the others (dvc#10984); write "
                "the value out at each key")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        first: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in first:
                    self.problems.append(
                        f"{_where(key_node.start_mark)}key {key!r} appears twice (first on line "
                        f"{first[key].line + 1}); YAML readers keep one silently: delete one")
                first.setdefault(key, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
    base = {"0o": 8, "0x": 16}.get(digits[:2].lower(), 10)
    return sign * int(digits[2:] if base != 10 else digits, base)


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_ParamsLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _NUMBER_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ParamsLoader.add_implicit_resolver(  # before float: `10` is an int
    _NUMBER_TAGS[0], re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_ParamsLoader.add_implicit_resolver(
    _NUMBER_TAGS[1], re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))
_ParamsLoader.add_constructor(_NUMBER_TAGS[0], _construct_int)


def _where(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""


def read_yaml(path: Path) -> tuple[Any, list[str]]:
    """The plain data of a params file and the problems met reading it (duplicate keys,
    aliases); a file that is not YAML raises ParamsError."""
    try:
        with path.open(encoding="utf-8") as stream:
            loader = _ParamsLoader(stream)
            try:
                return loader.get_single_data(), loader.problems
            finally:
                loader.dispose()
    except yaml.YAMLError as error:  # a syntax error, or a tag the safe loader refuses
        raise ParamsError(f"{path}: {_yaml_problem(error)}") from None
    except UnicodeDecodeError as error:
        raise ParamsError(f"{path}: not UTF-8 text (byte {error.start})") from None


# ---------------------------------------------------------------------------------------------
# Parsing

def load_params(path: str | Path) -> Params:
    """Read and validate params.yaml; raises ParamsError naming every bad key at once."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found; pass --params with its path")
    raw, problems = read_yaml(path)
    problems = [f"{path}: {problem}" for problem in problems]
    bad_keys: list[str] = []
    params = _parse(Params, {} if raw is None else raw, "", bad_keys)
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


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: where and what, from PyYAML's multi-line message."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if isinstance(error, yaml.constructor.ConstructorError):
        return (f"{_where(mark)}{problem}; params.yaml holds plain values only (no YAML tags "
                "such as !!python/...)")
    return f"{_where(mark)}not valid YAML ({problem})"


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
    for key, (low, high) in (("crop_scale", params.augment.crop_scale),
                             ("crop_ratio", params.augment.crop_ratio)):
        if not 0 < low <= high:
            problems.append(f"augment.{key}: expected [low, high] with 0 < low <= high, "
                            f"got {[low, high]}")
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
    num_classes = SOURCE_CLASSES.get(params.data.source, params.data.num_classes
                                     if params.data.source == "split_lists" else 0)
    if num_classes:  # else known after prepare: `data_problems`
        problems += _class_problems(params, num_classes, f"data.source {params.data.source}")
    if student.views_per_decode > params.logits.views:
        problems.append(f"student.views_per_decode: {student.views_per_decode} exceeds the "
                        f"{params.logits.views} cached views (logits.views); the extra crops "
                        "would repeat")
    return problems


def _class_problems(params: Params, num_classes: int, source: str) -> list[str]:
    problems = []
    logits, student = params.logits, params.student
    if logits.topk > num_classes:
        problems.append(f"logits.topk: {logits.topk} exceeds the {num_classes} classes of "
                        f"{source}; set logits.topk <= {num_classes}")
    elif (student.loss == "ikl" and logits.tail == "none" and logits.topk < num_classes
            and not student.ikl.approximate_tail and not student.online_teacher):
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
    if params.data.source not in SOURCE_CLASSES:
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


# Class counts fixed by the source (others: data.num_classes, or known after prepare).
SOURCE_CLASSES = {"digits_lt": 10, "cifar10_lt": 10, "cifar100_lt": 100, "glyphs_lt": 100}


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


def parse(cls: type, raw: Any, key_path: str) -> Any:
    """Build dataclass `cls` from a plain mapping, checking keys, types and ranges; raises
    ParamsError listing every bad key."""
    problems: list[str] = []
    parsed = _parse(cls, raw, key_path, problems)
    if problems:
        raise ParamsError(problems)
    return parsed


def _parse(cls: type, raw: Any, key_path: str, problems: list[str]) -> Any:
    """`parse`, appending each bad key's line to `problems`; a bad value keeps its default."""
    if not isinstance(raw, dict):
        problems.append(f"{key_path or 'params'}: expected a mapping, got {raw!r}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in sorted(set(raw) - set(fields), key=str):
        where = f"{key_path}.{name}" if key_path else name
        problems.append(f"{where}: unknown key (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        if name not in fields:
            continue
        child_path = f"{key_path}.{name}" if key_path else name
        hint, rule = hints[name], fields[name].metadata.get("rule")
        optional = _optional_of(hint)
        if optional is not None:  # `int | None`: null keeps None, anything else is an int
            if value is None:
                values[name] = None
                continue
            hint = optional
        if hint in (bool, int, float, str):
            converted = _scalar(hint, value)
            if converted is None or (rule and not rule[1](converted)):
                # a string's rule names its choices; a number's qualifies it (">= 0")
                wanted = (rule[0] if hint is str else f"{_describe(hint)} {rule[0]}"
                          ) if rule else _describe(hint)
                if isinstance(value, float) and not math.isfinite(value):
                    wanted = "a finite number" + (f" {rule[0]}" if rule else "")
                problems.append(f"{child_path}: expected {wanted}, got {value!r}")
                continue
            values[name] = converted
        else:
            before = len(problems)
            converted = _convert(hint, value, child_path, problems)
            if len(problems) == before or dataclasses.is_dataclass(hint) or (
                    typing.get_origin(hint) is dict and converted):
                values[name] = converted  # a section keeps its good keys
    return cls(**values)


def _convert(hint: Any, value: Any, key_path: str, problems: list[str]) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _parse(hint, value, key_path, problems)
    if origin is dict:
        _, value_hint = typing.get_args(hint)
        if not isinstance(value, dict) or not value:
            problems.append(f"{key_path}: expected a non-empty mapping, got {value!r}")
            return None
        return {str(k): _convert(value_hint, v, f"{key_path}.{k}", problems)
                for k, v in value.items()}
    if origin is tuple:
        item_hints = typing.get_args(hint)
        if item_hints[-1] is Ellipsis:  # tuple[float, ...]: any length but empty
            item_hints = item_hints[:1] * len(value) if isinstance(value, (list, tuple)) else ()
        items = [_scalar(h, v) for h, v in zip(item_hints, value)] if item_hints else []
        if (not isinstance(value, (list, tuple)) or not value or len(value) != len(item_hints)
                or None in items):
            count = len(item_hints) or "some"
            problems.append(f"{key_path}: expected a list of {count} numbers (finite), got "
                            f"{value!r}")
            return None
        return tuple(items)
    raise TypeError(f"{key_path}: unsupported params type {hint}")  # a schema bug, not user's


def _optional_of(hint: Any) -> Any:
    """X for a hint `X | None`, else None."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and len(args) == 2 and type(None) in args:
        return next(arg for arg in args if arg is not type(None))
    return None


def _scalar(hint: type, value: Any) -> Any:
    """`value` as type `hint`, or None when it is not one (ints are accepted as floats;
    .inf and .nan are not numbers a run can use)."""
    if hint is bool:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if hint is float and isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    return value if isinstance(value, hint) else None


def _describe(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}[hint]


def to_dict(params: Any) -> dict:
    """Plain-data form of a params dataclass (for checkpoints and store attributes)."""
    return dataclasses.asdict(params)
