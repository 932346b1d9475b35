"""The wheel holds every module of the package, and every module imports from an install
outside the repository (a hand-kept package list once left pipeline/store out of it)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_files() -> set[str]:
    """Package files of the source tree, as paths inside a wheel."""
    files = {path.relative_to(ROOT).as_posix() for path in (ROOT / "pipeline").rglob("*")
             if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts}
    return files


def test_the_wheel_installs_and_every_module_imports_outside_the_repository(tmp_path):
    # Nothing of the calling environment may point back at the repository.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    # Built from a copy of what a clone holds: an in-tree build would reuse a stale build/.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "pipeline", source / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(source)], check=True, env=env)
    wheel, = (tmp_path / "dist").glob("*.whl")
    packaged = {name for name in zipfile.ZipFile(wheel).namelist()
                if name.startswith("pipeline/")}
    assert packaged == source_files()

    # A fresh environment that sees the machine's packages (torch, zarr, ...) but installs
    # this project only from the wheel; run from outside the repository.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, env=env)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, env=env)
    modules = sorted(".".join(Path(name).with_suffix("").parts).removesuffix(".__init__")
                     for name in packaged if name.endswith(".py"))
    modules.remove("pipeline.__main__")  # runs the CLI: checked below as `python -m pipeline`
    script = ("import importlib, sys\n"
              f"for name in {modules!r}:\n"
              "    module = importlib.import_module(name)\n"
              f"    assert module.__file__.startswith({str(venv)!r}), module.__file__\n"
              "print(len(sys.modules))\n")
    result = subprocess.run([str(python), "-c", script], cwd="/", env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    for command in ([str(venv / "bin" / "ikl-pipeline"), "--help"],
                    [str(python), "-m", "pipeline", "--help"]):
        shown = subprocess.run(command, cwd="/", env=env, capture_output=True, text=True)
        assert shown.returncode == 0 and "inspect" in shown.stdout, shown.stderr[-2000:]
