"""The paper's ImageNet-LT table as runnable presets.

`imagenet_lt.yaml` (beside this file) is the params file; each row below is the set of
`dvc exp run -S key=value` overrides that turns it into one run of the paper's table, with the
paper's top-1 accuracy (%) beside it. Baselines are the CE-trained `teachers` entries.
"""

from __future__ import annotations

from pathlib import Path

BASE_PARAMS = Path(__file__).with_name("imagenet_lt.yaml")

# The embedded 100-class data set on CPU: a complete params file, applied as it is.
GLYPHS_LT_PARAMS = Path(__file__).with_name("glyphs_lt.yaml")

_X101 = "resnext101_32x4d"
_GI = {"student.ikl.weights": "class_prior", "student.ikl.weight_temperature": 1.0,
       "student.ikl.gamma": 0.3, "student.ikl.normalize": True}

# name -> (paper top-1 % or None when the paper gives no number, overrides)
IMAGENET_LT_ROWS: dict[str, tuple[float | None, dict]] = {
    "kl-x101-r18": (43.97, {"student.teacher": _X101, "student.arch": "resnet18",
                            "student.loss": "kl", "student.kl.weight": 4.0}),
    "kl-x101-r50": (48.31, {"student.teacher": _X101, "student.arch": "resnet50",
                            "student.loss": "kl", "student.kl.weight": 3.0}),
    "kl-r50-r50": (47.04, {"student.teacher": "resnet50", "student.arch": "resnet50",
                           "student.loss": "kl", "student.kl.weight": 1.0}),
    "ikl-x101-r18": (44.88, {"student.teacher": _X101, "student.arch": "resnet18",
                             "student.loss": "ikl", "student.ikl.alpha": 4.0,
                             "student.ikl.beta": 4.0}),
    "ikl-x101-r50": (49.22, {"student.teacher": _X101, "student.arch": "resnet50",
                             "student.loss": "ikl", "student.ikl.alpha": 3.0,
                             "student.ikl.beta": 4.0}),
    "ikl-r50-r50": (47.50, {"student.teacher": "resnet50", "student.arch": "resnet50",
                            "student.loss": "ikl", "student.ikl.alpha": 1.0,
                            "student.ikl.beta": 1.0}),
    "ikl-r18-r18": (None, {"student.teacher": "resnet18", "student.arch": "resnet18",
                           "student.loss": "ikl", "student.ikl.alpha": 1.0,
                           "student.ikl.beta": 0.5}),
    "ikl-gi-x101-r18": (None, {"student.teacher": _X101, "student.arch": "resnet18",
                               "student.loss": "ikl", "student.ikl.alpha": 4.0,
                               "student.ikl.beta": 4.0, **_GI}),
    "ikl-gi-x101-r50": (None, {"student.teacher": _X101, "student.arch": "resnet50",
                               "student.loss": "ikl", "student.ikl.alpha": 3.0,
                               "student.ikl.beta": 4.0, **_GI}),
}

# The CE baselines are the teachers themselves: evaluate_teacher@NAME.
IMAGENET_LT_BASELINES = {"resnet18": 41.15, "resnet50": 45.48, _X101: 48.02}


def exp_run_command(name: str) -> str:
    """The `dvc exp run` command line for one row."""
    _, overrides = IMAGENET_LT_ROWS[name]
    sets = " ".join(f"-S {key}={_yaml(value)}" for key, value in overrides.items())
    return f"dvc exp run -n {name} {sets}"


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
