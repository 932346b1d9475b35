"""Stage train_teacher: train one entry of `teachers` with CE."""

import click

from pipeline.entry import HELP_OPTIONS, check_tracked_weights, run_stage
from pipeline.train.runs import train_teacher
from pipeline.launch import run_on_every_device
from pipeline.params import load_params


@click.command(context_settings=HELP_OPTIONS)
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="The params file; reads `seed`, `augment`, `teachers.NAME`, `evaluate`.")
@click.option("--name", required=True, help="The teacher: a key of `teachers`.")
@click.option("--shards", required=True, help="Folder written by prepare.")
@click.option("--out", required=True, help="Folder for checkpoint.pt (resumes from it).")
@click.option("--live", required=True, help="Folder for dvclive metrics and plots.")
@click.option("--weights-dir", default="weights", show_default=True,
              help="The folder DVC tracks for `teachers.NAME.weights` files.")
@run_stage
def main(params_file: str, name: str, shards: str, out: str, live: str,
         weights_dir: str) -> None:
    """Train teacher NAME on the train shards, validating every epoch."""
    params = load_params(params_file)
    if run_on_every_device(params.runtime.devices):  # the ranks did the work
        return
    if name not in params.teachers:
        raise click.BadParameter(f"{name!r} is not a key of teachers "
                                 f"(known: {', '.join(params.teachers)})", param_hint="--name")
    check_tracked_weights(params.teachers[name].weights, weights_dir, f"teachers.{name}")
    metrics = train_teacher(params, name, shards, out, live)
    click.echo(f"teacher {name}: val top-1 {metrics.get('val/top1', float('nan')):.2f}%")


if __name__ == "__main__":
    main()
