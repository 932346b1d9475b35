"""Run a stage script, recording the rows of every training step of this rank.

Used by test_distributed.py, with or without torchrun: `python tests/record_training_rows.py
OUT_DIR stages/train_student.py --params ...` writes OUT_DIR/rank{RANK}.json:
{"steps_per_epoch": n, "epochs": [[[row, ...] per step] per epoch]}.
"""

import json
import os
import runpy
import sys
from dataclasses import replace
from pathlib import Path

import pipeline.train.runs

real_fit = pipeline.train.runs.fit


def recording_fit(model, run, out_dir, live_dir):
    epochs = []

    def batches(epoch):
        epochs.append([])
        for batch in run.train_batches(epoch):
            epochs[-1].append(batch["rows"].tolist())
            yield batch

    metrics = real_fit(model, replace(run, train_batches=batches), out_dir, live_dir)
    record = {"steps_per_epoch": run.steps_per_epoch, "epochs": epochs}
    path = Path(record_dir) / f"rank{os.environ.get('RANK', '0')}.json"
    path.write_text(json.dumps(record))
    return metrics


pipeline.train.runs.fit = recording_fit
record_dir, script, sys.argv = sys.argv[1], sys.argv[2], sys.argv[2:]
runpy.run_path(script, run_name="__main__")
