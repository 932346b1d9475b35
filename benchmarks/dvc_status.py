"""What tracking the user's data costs `dvc status` (issue 19, item 4): prepare depends on
`data.root` and the split lists (dvc.yaml), so DVC hashes the image folder.

    python benchmarks/dvc_status.py                       # 100,000 files of 2 KiB (~2 min)
    python benchmarks/dvc_status.py --files 10000         # quicker

A throwaway git + DVC project with prepare's templated data dependencies (the stage command is a
no-op: only DVC's own work is timed), on a generated ImageFolder of --classes folders of
random --size-byte .jpg files. Each dvc command runs as a child process; wall and CPU seconds:
1. `dvc repro`: DVC hashes every file once (md5, bytes-bound) and records the hashes;
2. `dvc status` warm, --rounds times (median): DVC's state database maps each file's inode,
   mtime and size to its hash, so only a stat per file is left;
3. `dvc status` after deleting DVC's state and caches (DVC_SITE_CACHE_DIR, .dvc/tmp): the
   first call on a fresh clone or machine, which hashes every file again;
4. one image added: `dvc status` reports prepare changed (checked), and its time.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_line, median  # noqa: E402

DVC_YAML = """stages:
  prepare:
    cmd: echo prepared > prepared.txt
    deps:
      - ${data.root}
      - ${data.train_list}
      - ${data.val_list}
      - ${data.test_list}
    outs:
      - prepared.txt
"""


def timed(command: list[str], cwd: Path, env: dict) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the child, its stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, result.stdout


def write_folder(root: Path, files: int, classes: int, size: int) -> int:
    per_class = -(-files // classes)
    written = 0
    for label in range(classes):
        folder = root / f"class_{label:03d}"
        folder.mkdir(parents=True)
        for index in range(min(per_class, files - written)):
            (folder / f"{index:05d}.jpg").write_bytes(os.urandom(size))
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--size", type=int, default=2048, help="bytes per image file")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="dvc_status_"))
    project, site = work / "project", work / "dvc-site"
    shutil.rmtree(work, ignore_errors=True)
    project.mkdir(parents=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(site),
           "DVC_GLOBAL_CONFIG_DIR": str(work / "dvc-global")}
    dvc = [sys.executable, "-m", "dvc"]

    start = time.perf_counter()
    count = write_folder(project / "images", args.files, args.classes, args.size)
    print(f"{count:,} files of {args.size} bytes in {args.classes} class folders "
          f"({count * args.size / 2**20:.0f} MiB) written in {time.perf_counter() - start:.1f} s")
    (project / "lists.txt").write_text("the split lists' stand-in\n")
    (project / "params.yaml").write_text(
        "data:\n  root: images\n  train_list: lists.txt\n  val_list: lists.txt\n"
        "  test_list: lists.txt\n")
    (project / "dvc.yaml").write_text(DVC_YAML)
    for command in (["git", "init", "-q"], [*dvc, "init", "-q"]):
        subprocess.run(command, cwd=project, env=env, check=True, capture_output=True)
    print(load_line())

    wall, cpu, _ = timed([*dvc, "repro"], project, env)
    print(f"1. dvc repro (hashes every file):          {wall:7.2f} s wall  {cpu:7.2f} s CPU")
    warm = [timed([*dvc, "status"], project, env) for _ in range(args.rounds)]
    assert all("up to date" in out for _, _, out in warm), warm[0][2]
    print(f"2. dvc status, warm (median of {args.rounds}):       "
          f"{median(w for w, _, _ in warm):7.2f} s wall  {median(c for _, c, _ in warm):7.2f} s CPU"
          f"   (each: {', '.join(f'{w:.2f}' for w, _, _ in warm)} s)")
    shutil.rmtree(site, ignore_errors=True)
    shutil.rmtree(project / ".dvc" / "tmp", ignore_errors=True)
    wall, cpu, out = timed([*dvc, "status"], project, env)
    assert "up to date" in out, out
    print(f"3. dvc status, first call (no DVC state):  {wall:7.2f} s wall  {cpu:7.2f} s CPU")
    (project / "images" / "class_000" / "added.jpg").write_bytes(os.urandom(args.size))
    wall, cpu, out = timed([*dvc, "status"], project, env)
    assert "prepare:" in out and "modified:" in out and "images" in out, out
    print(f"4. dvc status, one image added:            {wall:7.2f} s wall  {cpu:7.2f} s CPU"
          "   (reports prepare changed: yes)")
    print(load_line())
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
