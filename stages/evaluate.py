"""Stage evaluate: a trained model on the test split, with the long-tail breakdown."""

import click

from pipeline.entry import HELP_OPTIONS, run_stage
from pipeline.train.evaluate import evaluate_checkpoint
from pipeline.params import load_params


@click.command(context_settings=HELP_OPTIONS)
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="The params file; reads `evaluate`.")
@click.option("--name", default="model", show_default=True,
              help="The model's name, for the plot's title (a teacher's key or student).")
@click.option("--shards", required=True, help="Folder written by prepare.")
@click.option("--checkpoint", required=True, help="The model's checkpoint.pt.")
@click.option("--metrics", "metrics_file", required=True,
              help="JSON for `dvc metrics show`: top1, top5, many/medium/few, ece, nll, "
                   "ece_many/medium/few.")
@click.option("--per-class", "per_class_file", required=True,
              help="CSV: per-class accuracy and train count, for `dvc plots show`.")
@click.option("--plot", "plot_file", default=None,
              help="PNG: per-class accuracy against train count and the reliability diagram "
                   "(opens offline).")
@click.option("--reliability", "reliability_file", default=None,
              help="CSV: the reliability diagram's 15 confidence bins.")
@click.option("--evaluated", "evaluated_file", default=None,
              help="JSON: the checkpoint's sha256 and the classes per group, beside the "
                   "metrics (not metrics).")
@run_stage
def main(params_file: str, name: str, shards: str, checkpoint: str, metrics_file: str,
         per_class_file: str, plot_file: str | None, reliability_file: str | None,
         evaluated_file: str | None) -> None:
    """Evaluate CHECKPOINT on the test split and write its metrics and per-class table."""
    params = load_params(params_file)
    metrics = evaluate_checkpoint(params.evaluate, shards, checkpoint, metrics_file,
                                  per_class_file, plot_file, name,
                                  reliability_file=reliability_file,
                                  evaluated_file=evaluated_file)
    groups = ", ".join(f"{g} {metrics[g]:.1f}" for g in ("many", "medium", "few")
                       if metrics[g] is not None)
    click.echo(f"{checkpoint}: top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% "
               f"({groups}), ECE {metrics['ece']:.4f}, NLL {metrics['nll']:.4f}")


if __name__ == "__main__":
    main()
