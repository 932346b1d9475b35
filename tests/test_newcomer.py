"""The small things a newcomer trips on: -h on every stage, the smoke preset, .gitignore."""

import importlib
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.tools.cli import cli
from pipeline.params import Params, check_consistency, parse
from pipeline.tools.presets import SMOKE_PARAMS

REPO = Path(__file__).resolve().parents[1]
STAGES = sorted(path.stem for path in (REPO / "stages").glob("*.py") if path.stem != "__init__")


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_takes_h_and_help(stage):
    command = importlib.import_module(f"stages.{stage}").main
    short, long = (CliRunner().invoke(command, [flag]) for flag in ("-h", "--help"))
    assert short.exit_code == long.exit_code == 0
    assert short.output == long.output and "-h, --help" in short.output


def test_every_stage_of_dvc_yaml_has_a_script():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    scripts = {stage.get("do", stage)["cmd"].split()[1] for stage in stages.values()}
    assert scripts == {f"stages/{name}.py" for name in STAGES}


def test_smoke_preset_is_valid_and_presets_prints_how_to_apply_it():
    params = check_consistency(parse(Params, yaml.safe_load(SMOKE_PARAMS.read_text()), ""))
    assert params.data.source == "digits_lt" and list(params.teachers) == ["teacher"]
    assert max(t.epochs for t in (*params.teachers.values(), params.student)) == 1
    output = CliRunner().invoke(cli, ["presets"]).output
    assert f"cp {SMOKE_PARAMS} params.yaml && dvc repro" in output
    assert "git checkout -- params.yaml dvc.lock results figures" in output


def test_gitignore_keeps_dvc_plots_and_weights_out():
    lines = (REPO / ".gitignore").read_text().splitlines()
    assert {"dvc_plots/", "/weights/*", "!/weights/README.md"} <= set(lines)
    assert (REPO / "weights" / "README.md").is_file()  # the folder dvc.yaml depends on


def test_the_cli_lists_every_command_with_one_line_of_help():
    """`python -m pipeline --help` (and `ikl-pipeline`, the same click group) names every
    command on one line with its help, not a truncated sentence."""
    import subprocess
    import sys
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"ikl-pipeline": "pipeline.tools.cli:cli"}
    output = subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    commands = output.split("Commands:\n", 1)[1].splitlines()
    assert {line.split()[0] for line in commands if line.strip()} == set(cli.commands)
    assert len(commands) == len(cli.commands)  # one line each: nothing wrapped
    for line in commands:
        assert len(line) <= 80 and not line.rstrip().endswith("..."), line
