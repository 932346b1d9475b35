"""`dvc repro` end to end on the embedded digits-LT data, in a throwaway copy of the repository.

Tiny settings (16 px, 86 train rows, resnet8 teacher and baseline, one epoch, V = 2) keep it
well under a minute; most of the time is the nine stage processes starting Python and torch.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from helpers import DIGITS, TRAIN, toy_raw_params
from pipeline.store import open_store

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 480  # seconds per dvc command: a hung stage fails the test instead of the suite
#   (ten stage processes took up to 240 s on 2 cores shared with other jobs)
# Outputs of a previous run in the working tree: the copy must produce its own.
RUN_OUTPUTS = ("dvc.lock", "results/", "figures/")

# The toy world on the digits in shards of 32, with a second teacher (the baseline), and every
# key a stage lists in dvc.yaml in the params file (DVC refuses otherwise).
TINY_PARAMS = toy_raw_params(
    {**DIGITS, "shard_size": 32, **{key: "data/embedded.md" for key in (
        "root", "train_list", "val_list", "test_list")}},
    teachers={"baseline": TRAIN},
    augment={"flip_probability": 0.0},
    # k < C with the quantised tail, as params.yaml: the IKL student needs every class's logit
    logits={"topk": 5},
    student={"decode": "auto"},
    evaluate={"batch_size": 256, "every_epoch_on_test": False})
ALL_STAGES = {"prepare", "train_teacher@teacher", "train_teacher@baseline",
              "dump_logits@teacher", "dump_logits@baseline", "train_student",
              "evaluate_teacher@teacher", "evaluate_teacher@baseline", "evaluate_student",
              "figures"}

# dvc is a dependency of the package (installed by the test command) and git is what DVC works
# in: both are required, so this test runs everywhere the tests run and never skips.
DVC = [sys.executable, "-m", "dvc"]


def copy_repository(target: Path) -> None:
    """Tracked files plus untracked ones git does not ignore, without earlier run outputs."""
    listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                              "-z"], cwd=REPO, check=True, capture_output=True, text=True)
    for name in filter(None, listing.stdout.split("\0")):
        source = REPO / name
        if name.startswith(RUN_OUTPUTS) or not source.is_file():  # skip deleted files too
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / name)


def run(command: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
    return output


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def missing_dependencies(repo: Path) -> list[str]:
    """`stage: path` for every dependency dvc.yaml names that the repository lacks (a stale path
    after a file moved), so the test says so at once instead of after minutes of `dvc repro`."""
    stages = {name: stage.get("do", stage) for name, stage in
              yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].items()}
    outputs = {next(iter(out)) if isinstance(out, dict) else out
               for stage in stages.values() for kind in ("outs", "metrics", "plots")
               for out in stage.get(kind, [])}
    missing = []
    for name, stage in stages.items():
        for dependency in stage.get("deps", []):
            made_by_a_stage = "${" in dependency or any(
                output == dependency or output.startswith(dependency.rstrip("/") + "/")
                for output in outputs)
            if not made_by_a_stage and not (repo / dependency).exists():
                missing.append(f"{name}: {dependency}")
    return missing


def test_dvc_yaml_names_only_existing_source_dependencies():
    assert missing_dependencies(REPO) == []


def test_dvc_repro_runs_every_stage_once_then_only_what_params_touch(tmp_path):
    repo = tmp_path / "repo"
    copy_repository(repo)
    assert missing_dependencies(repo) == [], "dvc.yaml names files that do not exist"
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    env = {**os.environ,
           "PYTHONPATH": str(repo),  # the stages import the copy's pipeline, not the install's
           "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"),
           "DVC_GLOBAL_CONFIG_DIR": str(tmp_path / "dvc-global")}
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com",
           "-c", "commit.gpgsign=false"]
    run(git + ["init", "-q"], repo, env)
    run(git + ["add", "-A"], repo, env)
    run(git + ["commit", "-q", "-m", "copy"], repo, env)

    output = run([*DVC, "repro"], repo, env)
    assert stages_run(output) == ALL_STAGES
    manifest = json.loads((repo / "data/shards/manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 86
    for name in ("teacher", "baseline", "student"):
        assert (repo / "models" / name / "checkpoint.pt").is_file()
        metrics = json.loads((repo / "results" / name / "test.json").read_text())
        assert {"top1", "top5", "many", "medium", "few"} <= set(metrics)
        assert 0 <= metrics["top1"] <= 100
        assert (repo / "results" / name / "per_class.csv").is_file()
        assert (repo / "results" / name / "per_class.png").is_file()
    for name in ("teacher", "baseline"):
        store = open_store(str(repo / "data" / "logits" / f"{name}.zarr"),
                           fingerprint=manifest["fingerprint"], seed=0)
        assert (store.views, store.rows, store.topk, store.num_classes) == (2, 86, 5, 10)
        assert store.tail == "quantized" and store.exact_logits
    assert (repo / "results/student/train/metrics.json").is_file()
    assert {path.name for path in (repo / "figures").iterdir()} == {"per_class.png",
                                                                   "training_curves.png"}

    output = run([*DVC, "repro"], repo, env)
    assert stages_run(output) == set()
    assert "Data and pipelines are up to date" in output

    # A student-only change: `dvc status` finds only train_student stale; repro reruns it and
    # what depends on it (evaluate_student), never prepare, the teachers or the dumps.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["student"]["loss"] = "kl"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = set(json.loads(run([*DVC, "status", "--json"], repo, env)))
    assert stale == {"train_student"}
    edges = re.findall(r'"([^"]+)" -> "([^"]+)"', run([*DVC, "dag", "--dot"], repo, env))
    assert stale | downstream(stale, edges) == {"train_student", "evaluate_student", "figures"}


def downstream(stages: set[str], edges: list[tuple[str, str]]) -> set[str]:
    """Every stage reachable from `stages` along the DAG's edges."""
    found, frontier = set(), set(stages)
    while frontier:
        frontier = {child for parent, child in edges if parent in frontier} - found
        found |= frontier
    return found
