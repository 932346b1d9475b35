"""Run a stage script, but die (like a killed job) right after the first checkpoint is saved.

Used by test_distributed.py under torchrun: `python -m torch.distributed.run ...
tests/crash_after_first_checkpoint.py stages/train_teacher.py --params ...`.
"""

import os
import runpy
import sys

import pipeline.train.loop

save = pipeline.train.loop._save_checkpoint


def save_then_die(*args, **kwargs):
    save(*args, **kwargs)
    os._exit(17)  # no cleanup, like SIGKILL: torchrun then stops the other ranks


pipeline.train.loop._save_checkpoint = save_then_die
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
