"""Stage figures: every model's per-class accuracy side by side, and the training curves, as
PNGs that open offline (`dvc plots show` needs a CDN for its HTML)."""

import click

from pipeline.entry import HELP_OPTIONS, run_stage
from pipeline.params import load_params
from pipeline.tools.plots import write_figures


@click.command(context_settings=HELP_OPTIONS)
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="The params file; reads `teachers`, `student.arch`, `evaluate`.")
@click.option("--results", required=True,
              help="Folder with NAME/per_class.csv and NAME/train/ (dvclive) per model.")
@click.option("--out", required=True, help="Folder for per_class.png, training_curves.png.")
@run_stage
def main(params_file: str, results: str, out: str) -> None:
    """Draw the teachers' and the student's results side by side."""
    params = load_params(params_file)
    for path in write_figures(params, results, out):
        click.echo(f"{path}: written")


if __name__ == "__main__":
    main()
