"""The official DKL ImageNet-LT runs as presets: one row per script of the official repository.

`imagenet_lt.yaml` (beside this file) is the params file; each row below is the set of
`dvc exp run -S key=value` overrides that turns it into one official run, with the top-1
accuracy (%) the paper reports for it and, apart, the one the official repository's README
reports. The scripts are `sh/Distill/*.sh` of github.com/jiequancui/DKL (commit c5e8ad2):
DKLv1/Imbalanced_KD-dkl (baselines, KL-KD, IKL-KD) and DKLv2/Imbalanced_KD-dkl (GKL-KD; its
baseline and KL-KD scripts repeat v1's settings). Baselines are the CE-trained `teachers`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

BASE_PARAMS = Path(__file__).with_name("imagenet_lt.yaml")
OFFICIAL_REPOSITORY = "github.com/jiequancui/DKL"
SMOKE_PARAMS = Path(__file__).with_name("smoke.yaml")  # the whole pipeline in under a minute

# The embedded 100-class data set on CPU: a complete params file, applied as it is.
GLYPHS_LT_PARAMS = Path(__file__).with_name("glyphs_lt.yaml")

_X101 = "resnext101_32x4d"
_ARCH = {"X101": _X101, "R50": "resnet50", "R18": "resnet18"}
# GKL (DKLv2 scripts): --gamma 0.3 --T2 1.0 --GI, wMSE over the batch total; the official GI
# prior is the previous epoch's, which `student.ikl.prior: previous_epoch` reproduces.
_GKL = {"student.ikl.weights": "class_prior", "student.ikl.prior": "previous_epoch",
        "student.ikl.weight_temperature": 1.0, "student.ikl.gamma": 0.3,
        "student.ikl.normalize": True}


@dataclass(frozen=True)
class PresetRow:
    """One official script: its settings as overrides of imagenet_lt.yaml and its figures."""

    script: str  # path in the official repository
    paper_top1: float | None  # the paper's ImageNet-LT table; None: not in it
    readme_top1: float | None  # the official repository's README; None: not in it
    overrides: dict = field(default_factory=dict)  # dotted key -> value, as `-S`
    baseline: str | None = None  # CE rows: the `teachers` entry that is this baseline


def _baseline(tag: str, paper: float) -> PresetRow:
    return PresetRow(f"DKLv1/Imbalanced_KD-dkl/sh/Distill/ImageNetLT_train_{tag}_baseline.sh",
                     paper, paper, baseline=_ARCH[tag])


def _student(version: str, tag: str, suffix: str, paper, readme, loss: str,
             **options) -> PresetRow:
    teacher, student = _ARCH[tag[:-3]], _ARCH[tag[-3:]]
    keys = {"weight": "student.kl.weight", "alpha": "student.ikl.alpha",
            "beta": "student.ikl.beta"}
    overrides = {"student.teacher": teacher, "student.arch": student, "student.loss": loss,
                 **{keys[name]: value for name, value in options.items()}}
    if version == "DKLv2":
        overrides.update(_GKL)
    script = f"{version}/Imbalanced_KD-dkl/sh/Distill/ImageNetLT_train_{tag}_{suffix}.sh"
    return PresetRow(script, paper, readme, overrides)


# name -> row. KL-KD: --distill_loss KL_KD --distill_w; IKL-KD: --distill_loss IKL_KD --alpha
# --beta (sample-wise weights, T2 100); GKL-KD: --distill_loss GKL_KD as above.
IMAGENET_LT_ROWS: dict[str, PresetRow] = {
    "ce-r18": _baseline("R18", 41.150),
    "ce-r50": _baseline("R50", 45.476),
    "ce-x101": _baseline("X101", 48.024),
    "kl-x101-r18": _student("DKLv1", "X101R18", "distill", 43.974, 44.318, "kl", weight=4.0),
    "kl-x101-r50": _student("DKLv1", "X101R50", "distill", 48.310, 48.310, "kl", weight=3.0),
    "kl-r50-r50": _student("DKLv1", "R50R50", "distill", 47.036, 47.036, "kl", weight=1.0),
    "kl-r18-r18": _student("DKLv1", "R18R18", "distill", None, 42.732, "kl", weight=4.0),
    "ikl-x101-r18": _student("DKLv1", "X101R18", "distill_dkl", 44.880, 45.208, "ikl",
                             alpha=4.0, beta=4.0),
    "ikl-x101-r50": _student("DKLv1", "X101R50", "distill_dkl", 49.224, 49.224, "ikl",
                             alpha=3.0, beta=4.0),
    "ikl-r50-r50": _student("DKLv1", "R50R50", "distill_dkl", 47.504, 47.504, "ikl",
                            alpha=1.0, beta=1.0),
    "ikl-r18-r18": _student("DKLv1", "R18R18", "distill_dkl", None, 43.062, "ikl",
                            alpha=1.0, beta=0.5),
    "gkl-x101-r18": _student("DKLv2", "X101R18", "distill_dkl", None, 45.40, "ikl",
                             alpha=4.0, beta=4.0),
    "gkl-x101-r50": _student("DKLv2", "X101R50", "distill_dkl", None, 49.40, "ikl",
                             alpha=3.0, beta=4.0),
    "gkl-r50-r50": _student("DKLv2", "R50R50", "distill_dkl", None, None, "ikl",
                            alpha=1.0, beta=1.0),
}


def exp_run_command(name: str) -> str:
    """The command line for one row: `dvc exp run` with its overrides, or for a baseline the
    teacher's own training and evaluation stages."""
    row = IMAGENET_LT_ROWS[name]
    if row.baseline is not None:
        return f"dvc repro evaluate_teacher@{row.baseline}"
    sets = " ".join(f"-S {key}={_yaml(value)}" for key, value in row.overrides.items())
    return f"dvc exp run -n {name} {sets}"


def describe(name: str) -> str:
    """One line: the row's name, official script and figures."""
    row = IMAGENET_LT_ROWS[name]
    figure = lambda value: "-" if value is None else f"{value:.3f}%"  # noqa: E731
    return (f"{name}: {OFFICIAL_REPOSITORY}/{row.script}; paper top-1 {figure(row.paper_top1)}"
            f", official README top-1 {figure(row.readme_top1)}")


def apply_overrides(raw: dict, overrides: dict) -> dict:
    """A copy of the raw params mapping with dotted-key overrides applied (as `-S` does)."""
    import copy

    result = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = result
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return result


def _yaml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
