"""Stage dump_logits: one teacher's top-k logits on V seeded views of every train row."""

import click

from pipeline.entry import HELP_OPTIONS, run_stage
from pipeline.store.dump import dump_logits
from pipeline.launch import run_on_every_device
from pipeline.params import load_params


@click.command(context_settings=HELP_OPTIONS)
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="The params file; reads `seed`, `augment`, `logits`, `student.decode`.")
@click.option("--name", required=True, help="The teacher: a key of `teachers`.")
@click.option("--shards", required=True, help="Folder written by prepare.")
@click.option("--checkpoint", required=True, help="The teacher's checkpoint.pt.")
@click.option("--out", required=True, help="The Zarr store to write (resumes a partial one).")
@run_stage
def main(params_file: str, name: str, shards: str, checkpoint: str, out: str) -> None:
    """Write teacher NAME's logit store: top-k logits, classes, logsumexp, crops, priors."""
    params = load_params(params_file)
    if run_on_every_device(params.runtime.devices):  # the ranks did the work
        return
    dump_logits(params, name, shards, checkpoint, out)
    click.echo(f"{out}: complete; inspect it with `python -m pipeline inspect {out}`")


if __name__ == "__main__":
    main()
