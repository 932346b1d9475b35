"""pipeline.tools.results_table without DVC: which runs it queues, in what order, what it reads
from a results folder, and the paired comparison on hand-made figures."""

import json

import pytest

from pipeline.tools.results_table import (ROWS, collect, is_workspace, print_comparisons,
                                          queue_order, row_overrides, run_figures, set_params,
                                          targets)

PARAMS = {"seed": 0, "student": {"seed": None, "loss": "ikl", "online_teacher": False},
          "teachers": {"teacher": {"epochs": 10}, "baseline": {"epochs": 10}},
          "logits": {"topk": 5, "tail": "quantized"}}


def test_rows_seeds_targets_and_the_runs_the_workspace_already_holds():
    assert row_overrides(ROWS["ikl-exact"], 2, 100) == [
        "student.seed=2", "student.loss=ikl", "logits.topk=100", "logits.tail=none"]
    assert row_overrides(ROWS["baseline"], 1, 100) == ["teachers.baseline.seed=1"]
    assert targets(ROWS["baseline"]) == ["evaluate_teacher@baseline"]
    assert targets(ROWS["ikl-none"]) == ["evaluate_student"]


def test_a_key_params_yaml_does_not_spell_out_is_added_with_plus_plus():
    # DVC refuses `-S teachers.teacher.seed=1` when the key is absent ("not in struct").
    assert set_params(["teachers.teacher.seed=1", "student.seed=1", "student.loss=kl"],
                      PARAMS) == ["-S", "++teachers.teacher.seed=1", "-S", "student.seed=1",
                                  "-S", "student.loss=kl"]


def test_the_runs_the_workspace_already_holds(tmp_path):
    for model in ("student", "teacher"):
        (tmp_path / "results" / model).mkdir(parents=True)
        (tmp_path / "results" / model / "test.json").write_text("{}")
    # A null seed is the global seed: seed 0 of the preset's own rows is the workspace's run.
    assert is_workspace(ROWS["ikl"], 0, PARAMS, 100, tmp_path)
    assert is_workspace(ROWS["teacher"], 0, PARAMS, 100, tmp_path)
    assert not is_workspace(ROWS["baseline"], 0, PARAMS, 100, tmp_path)  # no results there
    assert not is_workspace(ROWS["ikl"], 1, PARAMS, 100, tmp_path)
    assert not is_workspace(ROWS["ikl-online"], 0, PARAMS, 100, tmp_path)
    assert not is_workspace(ROWS["ikl-exact"], 0, PARAMS, 100, tmp_path)


def test_queue_order_is_block_by_block_and_seed_by_seed():
    assert queue_order([["a", "b"], ["c"]], [0, 1]) == [
        ("a", 0), ("b", 0), ("a", 1), ("b", 1), ("c", 0), ("c", 1)]


def test_run_figures_reads_metrics_and_the_median_epoch_time(tmp_path):
    folder = tmp_path / "results/student"
    (folder / "train/plots/metrics/time").mkdir(parents=True)
    (folder / "test.json").write_text(json.dumps({"top1": 60.0, "ece": 0.05}))
    (folder / "train/plots/metrics/time/epoch_wall_s.tsv").write_text(
        "step\tepoch_wall_s\n0\t30\n1\t10\n2\t12\n")
    figures = run_figures(tmp_path, None, "student")
    assert figures == {"top1": 60.0, "ece": 0.05, "time/epoch_wall_s": 12.0,
                       "time/epoch_cpu_s": None}
    assert run_figures(tmp_path, None, "teacher") is None


def test_collect_reads_the_workspace_run_for_the_null_seed(tmp_path, monkeypatch):
    (tmp_path / "results/student").mkdir(parents=True)
    (tmp_path / "results/student/test.json").write_text(json.dumps({"top1": 61.0}))
    monkeypatch.setattr("pipeline.tools.results_table.experiments", lambda root: {})
    table = collect(tmp_path, ["ikl", "ikl-online"], [0, 1], PARAMS, 100)
    assert table == {ROWS["ikl"].label: {0: {"top1": 61.0, "time/epoch_wall_s": None,
                                             "time/epoch_cpu_s": None}}}


def test_paired_differences_per_seed(capsys):
    # b - a is 1.0, 1.2, 0.8 per seed: paired mean 1.0 ± 0.2 (beyond), while the seeds'
    # spread (std 5.0 and 4.9) hides it in the unpaired comparison.
    a = {s: {"top1": t, "few": 10.0, "ece": 0.1, "nll": 1.0} for s, t in enumerate([60, 65, 70])}
    b = {s: {"top1": a[s]["top1"] + d, "few": 10.0, "ece": 0.1, "nll": 1.0}
         for s, d in enumerate([1.0, 1.2, 0.8])}
    print_comparisons({"a": a, "b": b})
    out = capsys.readouterr().out
    assert "a vs b: -1.00 points (within 9.90)" in out
    assert "a - b (seeds 0,1,2): top1 -1.00 ± 0.20 (beyond); few +0.00 ± 0.00;" in out


@pytest.mark.parametrize("name", list(ROWS))
def test_every_row_names_its_models(name):
    assert ROWS[name].model in ("student", "teacher", "baseline")


def test_finished_experiments_are_read_from_dvc_refs(tmp_path):
    import subprocess

    from pipeline.tools.results_table import experiments

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], cwd=tmp_path, check=True)
    for message in ("old", "head"):
        subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", message], cwd=tmp_path,
                       check=True)
    head, old = subprocess.run(["git", "rev-list", "HEAD"], cwd=tmp_path, text=True,
                               capture_output=True, check=True).stdout.split()
    refs = {f"refs/exps/{old[:2]}/{old[2:]}/ikl-s1": old,  # of another baseline
            f"refs/exps/{head[:2]}/{head[2:]}/ikl-s1": head,  # of HEAD: wins
            f"refs/exps/{old[:2]}/{old[2:]}/kl-s1": old,
            "refs/exps/celery/stash": old}  # the queue, not an experiment
    for ref, commit in refs.items():
        subprocess.run(["git", "update-ref", ref, commit], cwd=tmp_path, check=True)
    assert experiments(tmp_path) == {"ikl-s1": head, "kl-s1": old}
