"""Every local device from a plain `dvc repro`: a stage started outside torchrun relaunches
itself once per device with PyTorch's elastic launcher (torch.distributed.launcher.api, the
machinery behind `torchrun --standalone`), so `python stages/train_student.py ...` on a machine
with 4 GPUs runs as `torchrun --standalone --nproc_per_node 4 stages/train_student.py ...`.

How many: `runtime.devices` in params.yaml (pipeline.params.RuntimeParams): null runs one
process per visible GPU, one on a CPU-only machine; N runs N (on a CPU, N gloo processes: how
the tests check it). A process started by torchrun (or by this launcher) never relaunches,
so multi-node runs stay `torchrun` by hand. The ranks inherit this process's environment;
OMP_NUM_THREADS is set to 1 when unset, as torchrun does. The command relaunched is the
interpreter's own (`sys.orig_argv`, wrappers such as tests/record_training_rows.py included),
so a stage command invoked in-process (click's CliRunner) must keep `runtime.devices` at 1 or
null on a CPU.
"""

from __future__ import annotations

import os
import sys
import uuid

import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from pipeline.errors import UserError


def launched() -> bool:
    """True in a process started by torchrun or elastic_launch (they set LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def local_processes(devices: int | None) -> int:
    """The processes `runtime.devices` asks for on this machine."""
    visible = torch.cuda.device_count()
    if devices is None:
        return max(1, visible)
    if visible and devices > visible:
        raise UserError(f"runtime.devices: {devices}, but {visible} GPUs are visible; set "
                        f"runtime.devices to at most {visible}, or null for all of them")
    return devices


def run_on_every_device(devices: int | None) -> bool:
    """Relaunch this very command (sys.orig_argv) once per device when this process was not
    launched and more than one is wanted; True when it did (the ranks did the stage's work:
    the caller returns), False when this process should do the work itself."""
    if launched():
        return False
    count = local_processes(devices)
    if count == 1:
        return False
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for several processes
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=count,
                          run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0",  # torchrun --standalone: a free port
                          max_restarts=0, start_method="spawn")
    print(f"launching {count} processes ({'GPUs' if torch.cuda.is_available() else 'gloo, CPU'})"
          f": {' '.join(sys.orig_argv[1:])}", flush=True)
    try:
        elastic_launch(config, sys.executable)(*sys.orig_argv[1:])
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        raise UserError(f"rank {rank} of {count} failed (exit code {failure.exitcode}); its "
                        "message is above") from None
    return True
