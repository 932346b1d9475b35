"""The README's results tables: students over several seeds, run with DVC's experiment queue.

    python benchmarks/results_table.py                  # queue, run and tabulate (digits)
    python benchmarks/results_table.py --collect-only   # tabulate experiments already run

Run it in a workspace where `dvc repro` has finished (the teachers, the baseline and the
stores are then in DVC's cache and every experiment only retrains and re-evaluates the
student). Each row x seed is queued as `dvc exp run --queue -n ROW-sSEED -S student.seed=SEED
-S <the row's overrides>`, the queue runs them one at a time (`dvc queue start --jobs 1`), and
the table gives mean +- std (sample std, n - 1) over the seeds of test top-1 and of the many /
medium / few-shot groups from each experiment's `results/student/test.json`, plus the teacher
and baseline rows of the workspace (one run each: their seeds are the data's, `seed`). Rows
whose means differ by more than the sum of their stds are marked in the printed comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("top1", "many", "medium", "few")
ROWS = {  # row name -> the `-S` overrides of params.yaml (the default student is IKL-KD)
    "ce": ["student.loss=ce"],
    "kl": ["student.loss=kl"],
    "kl-w4": ["student.loss=kl", "student.kl.weight=4.0"],
    "ikl": ["student.loss=ikl"],
    "ikl-gi": ["student.loss=ikl", "student.ikl.weights=class_prior",
               "student.ikl.weight_temperature=1.0", "student.ikl.gamma=0.3",
               "student.ikl.normalize=true"],
    "ikl-online": ["student.loss=ikl", "student.online_teacher=true"],
}
LABELS = {"ce": "student, CE on the cached views", "kl": "student, KL-KD",
          "kl-w4": "student, KL-KD at weight 4 (the official X101 -> R18 script's)",
          "ikl": "student, IKL-KD (quantised tail store)",
          "ikl-gi": "student, IKL-KD with GI weights (T2 1, gamma 0.3, normalised)",
          "ikl-online": "student, IKL-KD with the online teacher on the same views"}


def dvc(*arguments: str, capture: bool = False) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *arguments], cwd=ROOT, text=True,
                            capture_output=capture, check=True)
    return result.stdout if capture else ""


def queue(rows: list[str], seeds: list[int]) -> None:
    for row in rows:
        for seed in seeds:
            overrides = [f"student.seed={seed}", *ROWS[row]]
            dvc("exp", "run", "--queue", "-n", f"{row}-s{seed}",
                *[part for override in overrides for part in ("-S", override)])
    dvc("queue", "start", "--jobs", "1")
    while True:  # wait for the worker to drain the queue
        status = dvc("queue", "status", capture=True)
        if not any(word in status for word in ("Queued", "Running")):
            return
        time.sleep(20)


def experiments() -> dict[str, dict]:
    """Experiment name -> its results/student/test.json metrics, from `dvc exp show --json`."""
    shown = json.loads(dvc("exp", "show", "--json", "--all-commits", capture=True))
    found = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for revision in experiment.get("revs", []):
                name = revision.get("name")
                data = revision.get("data") or {}
                if data.get("rev") == "workspace":  # still running: its files are the base's
                    continue
                metrics = (data.get("metrics") or {}).get("results/student/test.json")
                if name and metrics and "data" in metrics:
                    found[name] = metrics["data"]
    return found


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(rows: list[str], seeds: list[int]) -> None:
    found = experiments()
    print("| model (test top-1 %) | seeds | " + " | ".join(METRICS) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    for name in ("teacher", "baseline"):
        path = ROOT / "results" / name / "test.json"
        if path.is_file():
            metrics = json.loads(path.read_text())
            print(f"| {name} (one run) | 1 | "
                  + " | ".join(f"{metrics[m]:.1f}" for m in METRICS) + " |")
    summary = {}
    for row in rows:
        runs = [found[f"{row}-s{seed}"] for seed in seeds if f"{row}-s{seed}" in found]
        if not runs:
            print(f"| {LABELS[row]} | 0 | " + " | ".join("–" for _ in METRICS) + " |")
            continue
        stats = {m: mean_std([run[m] for run in runs]) for m in METRICS}
        summary[row] = stats["top1"]
        print(f"| {LABELS[row]} | {len(runs)} | "
              + " | ".join(f"{mean:.1f} ± {std:.1f}" for mean, std in stats.values()) + " |")
    print("\ntop-1 differences beyond the spread (|mean a - mean b| > std a + std b):")
    names = list(summary)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (mean_a, std_a), (mean_b, std_b) = summary[a], summary[b]
            beyond = abs(mean_a - mean_b) > std_a + std_b
            print(f"  {a} vs {b}: {mean_a - mean_b:+.1f} points "
                  f"({'beyond' if beyond else 'within'} the spread)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                        help="the table's student rows (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--collect-only", action="store_true",
                        help="tabulate the experiments already run; queue nothing")
    args = parser.parse_args()
    if not args.collect_only:
        queue(args.rows, args.seeds)
    table(args.rows, args.seeds)


if __name__ == "__main__":
    main()
