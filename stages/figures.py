"""Stage figures: every model's per-class accuracy side by side, and the training curves, as
PNGs; and the page template that lets `dvc plots show` draw its interactive plots offline."""

import click

from pipeline.entry import HELP_OPTIONS, run_stage
from pipeline.params import load_params
from pipeline.tools.plots import write_figures
from pipeline.tools.plots_template import write_plots_template


@click.command(context_settings=HELP_OPTIONS)
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="The params file; reads `teachers`, `student.arch`, `evaluate`.")
@click.option("--results", required=True,
              help="Folder with NAME/per_class.csv and NAME/train/ (dvclive) per model.")
@click.option("--out", required=True, help="Folder for per_class.png, training_curves.png.")
@click.option("--plots-template", default=None,
              help="Also write the offline HTML template `dvc plots show` uses here (the path "
                   "plots.html_template names in .dvc/config).")
@run_stage
def main(params_file: str, results: str, out: str, plots_template: str | None) -> None:
    """Draw the teachers' and the student's results side by side."""
    params = load_params(params_file)
    for path in write_figures(params, results, out):
        click.echo(f"{path}: written")
    if plots_template:  # not a DVC output: DVC ignores .dvc/, where its config looks for it
        click.echo(f"{write_plots_template(plots_template)}: written (dvc plots show, offline)")


if __name__ == "__main__":
    main()
