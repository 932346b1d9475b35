"""The README's results tables: every row over several seeds, run with DVC's experiment queue.

    python -m pipeline.tools.results_table --preset glyphs_lt          # queue, run, tabulate
    python -m pipeline.tools.results_table --preset glyphs_lt --collect-only
    python -m pipeline.tools.results_table --preset digits --rows teacher baseline --queue-only

Run it in a workspace where the preset's `dvc repro` has finished and `params.yaml` and
`dvc.lock` are committed: the stores and models are then in DVC's cache, and each experiment
reruns only the stages its row needs. Each row x seed is queued as
`dvc exp run --queue -n ROW-sSEED -S <seed> -S <the row's overrides> <targets>`; the queue runs
them one at a time (`dvc queue start --jobs 1`). Student rows set `student.seed` (initial
weights and row order; the data, teachers and views stay fixed) and run `evaluate_student`
(with a store option, its `dump_logits@teacher` first); the `teacher` and `baseline` rows set
`teachers.NAME.seed` (the same, for that model) and run its `evaluate_teacher@NAME`. A row x
seed identical to the workspace (the preset's own student or a teacher at the global `seed`: a
null seed is that seed, bit for bit) is read from the workspace's results, not rerun.

The table: mean +- std (sample std, n - 1) over the seeds of test top-1, many / medium / few,
ECE (15 bins, fraction), NLL (nats), and the median over the seeds of each run's median wall
and CPU time per epoch (the queue's runs share the machine: read times as that machine's,
under that load). Then, for every pair of rows, the unpaired comparison (|mean a - mean b| >
std a + std b) and the paired one: the rows of one seed share the initial weights and row
order, so the per-seed differences a_s - b_s are compared, their mean +- std and whether |mean|
exceeds their std.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.errors import UserError

METRICS = ("top1", "many", "medium", "few", "ece", "nll")
PAIRED = ("top1", "few", "ece", "nll")  # the paired differences printed per pair
TIMES = ("time/epoch_wall_s", "time/epoch_cpu_s")


@dataclass(frozen=True)
class Row:
    label: str
    overrides: tuple[str, ...] = ()  # `-S` overrides; {classes} is the data set's C
    model: str = "student"  # the results/NAME/ folder this row reports: a teacher's or
    # the student's (a teacher row sets `teachers.NAME.seed`, a student row `student.seed`)


ROWS = {
    "teacher": Row("teacher, CE", model="teacher"),
    "baseline": Row("baseline (the student's arch), CE", model="baseline"),
    "ce": Row("student, CE on the cached views", ("student.loss=ce",)),
    "kl": Row("student, KL-KD", ("student.loss=kl",)),
    "kl-w4": Row("student, KL-KD at weight 4, quantised store",
                 ("student.loss=kl", "student.kl.weight=4.0")),
    "kl-w4-online": Row("student, KL-KD at weight 4, online teacher",
                        ("student.loss=kl", "student.kl.weight=4.0",
                         "student.online_teacher=true")),
    "ikl": Row("student, IKL-KD, top-5 + quantised tail store", ("student.loss=ikl",)),
    "ikl-online": Row("student, IKL-KD, online teacher",
                      ("student.loss=ikl", "student.online_teacher=true")),
    "ikl-none": Row("student, IKL-KD, top-5 store without tail (approximate_tail)",
                    ("student.loss=ikl", "logits.tail=none",
                     "student.ikl.approximate_tail=true")),
    "ikl-exact": Row("student, IKL-KD, exact store (topk = C)",
                     ("student.loss=ikl", "logits.topk={classes}", "logits.tail=none")),
    "ikl-gi": Row("student, IKL-KD with GI weights (T2 1, gamma 0.3, normalised)",
                  ("student.loss=ikl", "student.ikl.weights=class_prior",
                   "student.ikl.weight_temperature=1.0", "student.ikl.gamma=0.3",
                   "student.ikl.normalize=true")),
}
# Each preset's rows in blocks, queued block by block and, within a block, seed by seed: the
# comparisons that matter most can be read (paired) first, while the rest still runs.
PRESETS = {
    "glyphs_lt": ("glyphs_lt", [["ikl", "ikl-online"], ["ikl-none", "ikl-exact"],
                                ["kl-w4", "kl-w4-online"], ["teacher", "baseline"]]),
    "digits": ("digits_lt", [["teacher", "baseline"],
                             ["ce", "kl", "ikl", "ikl-gi", "ikl-online"]]),
}


def dvc(root: Path, *arguments: str, capture: bool = False) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *arguments], cwd=root, text=True,
                            capture_output=capture, check=True)
    return result.stdout if capture else ""


def workspace_params(root: Path) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


def lookup(params: dict, dotted: str):
    node = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def seed_overrides(row: Row, seed: int) -> list[str]:
    if row.model != "student":
        return [f"teachers.{row.model}.seed={seed}"]
    return [f"student.seed={seed}"]


def row_overrides(row: Row, seed: int, classes: int) -> list[str]:
    return seed_overrides(row, seed) + [o.format(classes=classes) for o in row.overrides]


def present(params: dict, dotted: str) -> bool:
    node = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def set_params(overrides: list[str], params: dict) -> list[str]:
    """`dvc exp run -S` arguments: a key that params.yaml does not spell out (a teacher's
    `seed`, null by default) is added with Hydra's `++`, which DVC needs for a new key."""
    return [part for override in overrides for part in (
        "-S", override if present(params, override.split("=", 1)[0]) else f"++{override}")]


def targets(row: Row) -> list[str]:
    return ["evaluate_student" if row.model == "student" else f"evaluate_teacher@{row.model}"]


def is_workspace(row: Row, seed: int, params: dict, classes: int, root: Path) -> bool:
    """Whether the workspace's own results are this row x seed: they exist, every override
    holds already and the seed is the one a null seed means (the global `seed`)."""
    if not (root / "results" / row.model / "test.json").is_file():
        return False
    for override in row_overrides(row, seed, classes):
        key, value = override.split("=", 1)
        current = lookup(params, key)
        if key.endswith(".seed") and current is None:
            current = params.get("seed", 0)
        if current != yaml.safe_load(value):
            return False
    return True


def queue_order(blocks: list[list[str]], seeds: list[int]) -> list[tuple[str, int]]:
    """(row, seed) in queue order: block by block, within a block seed by seed."""
    return [(name, seed) for block in blocks for seed in seeds for name in block]


def queue(root: Path, blocks: list[list[str]], seeds: list[int], params: dict,
          classes: int) -> None:
    for name, seed in queue_order(blocks, seeds):
        row = ROWS[name]
        if is_workspace(row, seed, params, classes, root):
            continue
        overrides = row_overrides(row, seed, classes)
        dvc(root, "exp", "run", "--queue", "-n", f"{name}-s{seed}",
            *set_params(overrides, params), *targets(row))
    dvc(root, "queue", "start", "--jobs", "1")


def wait(root: Path) -> None:
    while True:  # wait for the worker to drain the queue
        status = dvc(root, "queue", "status", capture=True)
        if not any(word in status for word in ("Queued", "Running")):
            return
        time.sleep(60)


def experiments(root: Path) -> dict[str, str]:
    """Finished experiment name -> its commit: DVC keeps each one as the git ref
    refs/exps/<baseline commit, split 2/38>/<name> (queued and running ones have none yet).
    An experiment of the current HEAD wins over one of the same name from another baseline."""
    listed = subprocess.run(["git", "for-each-ref", "refs/exps",
                             "--format=%(refname) %(objectname)"], cwd=root, text=True,
                            capture_output=True, check=True).stdout.split("\n")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, text=True,
                          capture_output=True, check=True).stdout.strip()
    found, of_head = {}, set()
    for line in filter(None, listed):
        ref, commit = line.split()
        parts = ref.split("/")  # refs, exps, 2 hex, 38 hex, name
        if len(parts) != 5:  # e.g. refs/exps/celery/stash: the queue itself
            continue
        name, baseline = parts[4], parts[2] + parts[3]
        if name not in of_head:
            found[name] = commit
        if baseline == head:
            of_head.add(name)
    return found


def read_at(root: Path, revision: str | None, path: str) -> str | None:
    """A file of the workspace (revision None) or of an experiment's commit; None if absent."""
    if revision is None:
        file = root / path
        return file.read_text() if file.is_file() else None
    result = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=root, text=True,
                            capture_output=True)
    return result.stdout if result.returncode == 0 else None


def run_figures(root: Path, revision: str | None, model: str) -> dict | None:
    """A model's test metrics plus the median of its per-epoch training times."""
    text = read_at(root, revision, f"results/{model}/test.json")
    if text is None:
        return None
    figures = json.loads(text)
    for name in TIMES:
        tsv = read_at(root, revision, f"results/{model}/train/plots/metrics/{name}.tsv")
        values = ([float(r[name.rsplit("/", 1)[-1]])
                   for r in csv.DictReader(io.StringIO(tsv), delimiter="\t")] if tsv else [])
        figures[name] = statistics.median(values) if values else None
    return figures


def collect(root: Path, rows: list[str], seeds: list[int], params: dict,
            classes: int) -> dict[str, dict[int, dict]]:
    """Table row label -> seed -> figures, for every run found."""
    found = experiments(root)
    table: dict[str, dict[int, dict]] = {}
    for name in rows:
        row = ROWS[name]
        for seed in seeds:
            workspace = is_workspace(row, seed, params, classes, root)
            if not workspace and f"{name}-s{seed}" not in found:
                continue
            figures = run_figures(root, None if workspace else found[f"{name}-s{seed}"],
                                  row.model)
            if figures is not None:
                table.setdefault(row.label, {})[seed] = figures
    return table


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: list, digits: int) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def median_cell(values: list) -> str:
    """The median over the seeds: the queue's runs share the machine with whatever else runs,
    and one run under heavy load would pull a mean far off."""
    values = [v for v in values if v is not None]
    return f"{statistics.median(values):.0f}" if values else "–"


def print_table(table: dict[str, dict[int, dict]]) -> None:
    print("| model (test) | seeds | top-1 % | many | medium | few | ECE | NLL "
          "| s / epoch (wall, CPU) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, runs in table.items():
        column = lambda m: [run.get(m) for run in runs.values()]  # noqa: E731
        times = ", ".join(median_cell(column(t)) for t in TIMES)
        print(f"| {label} | {len(runs)} | "
              + " | ".join(cell(column(m), 3 if m in ("ece", "nll") else 1) for m in METRICS)
              + f" | {times} |")


def print_comparisons(table: dict[str, dict[int, dict]]) -> None:
    labels = list(table)
    print("\nunpaired, top-1 (|mean a - mean b| > std a + std b is beyond the spread):")
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            if min(len(table[a]), len(table[b])) < 2:
                continue  # one run has no spread to compare against
            (mean_a, std_a), (mean_b, std_b) = (
                mean_std([run["top1"] for run in table[x].values()]) for x in (a, b))
            beyond = abs(mean_a - mean_b) > std_a + std_b
            print(f"  {a} vs {b}: {mean_a - mean_b:+.2f} points "
                  f"({'beyond' if beyond else 'within'} {std_a + std_b:.2f})")
    print("\npaired, per seed (mean ± std of a_s - b_s over the shared seeds; beyond: "
          "|mean| > std):")
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            seeds = sorted(set(table[a]) & set(table[b]))
            if len(seeds) < 2:
                continue
            parts = []
            for metric in PAIRED:
                differences = [table[a][s][metric] - table[b][s][metric] for s in seeds
                               if table[a][s].get(metric) is not None
                               and table[b][s].get(metric) is not None]
                if len(differences) < 2:
                    continue
                mean, std = mean_std(differences)
                digits = 4 if metric in ("ece", "nll") else 2
                parts.append(f"{metric} {mean:+.{digits}f} ± {std:.{digits}f}"
                             f"{' (beyond)' if abs(mean) > std else ''}")
            print(f"  {a} - {b} (seeds {','.join(map(str, seeds))}): " + "; ".join(parts))


def print_cost(table: dict[str, dict[int, dict]], dump_wall: float | None,
               dump_cpu: float | None, epochs: int) -> None:
    """What the cache saves per student, from the cached and online IKL rows' CPU times."""
    cached, online = ROWS["ikl"].label, ROWS["ikl-online"].label
    if cached not in table or online not in table or dump_cpu is None:
        return
    cpu = {label: statistics.median(run["time/epoch_cpu_s"] for run in table[label].values()
                                    if run.get("time/epoch_cpu_s") is not None)
           for label in (cached, online)}
    saved = (cpu[online] - cpu[cached]) * epochs
    print(f"\ncost: the dump took {dump_wall:.0f} s wall, {dump_cpu:.0f} s CPU once; a cached "
          f"IKL student trains {cpu[cached]:.1f} s CPU per epoch, an online one "
          f"{cpu[online]:.1f} s: {saved:.0f} s CPU saved per {epochs}-epoch student"
          + (f", the dump paid back after {dump_cpu / saved:.1f} students" if saved > 0
             else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="glyphs_lt",
                        help="the data set whose table this is (its rows, in queue order)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS),
                        help="the table's rows (default: the preset's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--root", type=Path, default=Path.cwd(),
                        help="the DVC workspace (default: the current folder)")
    parser.add_argument("--collect-only", action="store_true",
                        help="tabulate the experiments already run; queue nothing")
    parser.add_argument("--queue-only", action="store_true",
                        help="queue the runs and start the worker; do not wait")
    parser.add_argument("--dump-seconds", nargs=2, type=float, metavar=("WALL", "CPU"),
                        help="the teacher's dump, timed once (e.g. /usr/bin/time dvc repro "
                             "-s dump_logits@teacher): prints what the cache saves")
    args = parser.parse_args()
    source, blocks = PRESETS[args.preset]
    params = workspace_params(args.root)
    if lookup(params, "data.source") != source:
        raise UserError(f"{args.root / 'params.yaml'}: data.source is "
                        f"{lookup(params, 'data.source')}, not {source} of --preset "
                        f"{args.preset}; apply the preset and run `dvc repro` first")
    manifest = args.root / "data" / "shards" / "manifest.json"
    if not manifest.is_file():
        raise UserError(f"{manifest}: not found; run `dvc repro` in {args.root} first")
    classes = json.loads(manifest.read_text())["num_classes"]
    blocks = [args.rows] if args.rows else blocks
    rows = [name for block in blocks for name in block]
    if not args.collect_only:
        queue(args.root, blocks, args.seeds, params, classes)
        if args.queue_only:
            return
        wait(args.root)
    table = collect(args.root, rows, args.seeds, params, classes)
    print_table(table)
    print_comparisons(table)
    dump = args.dump_seconds or (None, None)
    print_cost(table, *dump, epochs=lookup(params, "student.epochs"))


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
