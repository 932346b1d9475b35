"""Stage train_student: the student against its teacher's cached logits."""

import click

from pipeline.entry import HELP_OPTIONS, check_tracked_weights, run_stage
from pipeline.train.runs import train_student
from pipeline.launch import run_on_every_device
from pipeline.params import load_params


@click.command(context_settings=HELP_OPTIONS)
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="The params file; reads `seed`, `augment`, `student`, `evaluate`.")
@click.option("--shards", required=True, help="Folder written by prepare.")
@click.option("--store", required=True, help="The teacher's logit store (dump_logits).")
@click.option("--teacher-checkpoint", required=True,
              help="The teacher's checkpoint.pt: its hash must match the store's.")
@click.option("--out", required=True, help="Folder for checkpoint.pt (resumes from it).")
@click.option("--live", required=True, help="Folder for dvclive metrics and plots.")
@click.option("--weights-dir", default="weights", show_default=True,
              help="The folder DVC tracks for a `student.weights` file.")
@run_stage
def main(params_file: str, shards: str, store: str, teacher_checkpoint: str, out: str,
         live: str, weights_dir: str) -> None:
    """Train the student with `student.loss` (ce, kl or ikl)."""
    params = load_params(params_file)
    check_tracked_weights(params.student.weights, weights_dir, "student")
    if run_on_every_device(params.runtime.devices):  # the ranks did the work
        return
    metrics = train_student(params, shards, store, teacher_checkpoint, out, live)
    click.echo(f"student: val top-1 {metrics.get('val/top1', float('nan')):.2f}%")


if __name__ == "__main__":
    main()
