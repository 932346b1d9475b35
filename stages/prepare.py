"""Stage prepare: the data source in params -> WebDataset shards + manifest.json."""

import click

from pipeline.entry import HELP_OPTIONS, run_stage
from pipeline.params import load_params
from pipeline.data.shards import prepare_shards


@click.command(context_settings=HELP_OPTIONS)
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              help="The params file; reads `seed` and `data`.")
@click.option("--out", required=True, help="Folder for the shards and manifest.json.")
@run_stage
def main(params_file: str, out: str) -> None:
    """Encode the `data` source into train/val/test tar shards and write the manifest."""
    params = load_params(params_file)
    manifest = prepare_shards(params.data, params.seed, out)
    rows = ", ".join(f"{split} {info['rows']}" for split, info in manifest["splits"].items())
    click.echo(f"{out}: {manifest['num_classes']} classes; rows: {rows}; skipped "
               f"{manifest['skipped']['count']}; ignored {manifest['ignored']['count']} (hidden, "
               "OS litter, not images: the manifest's 'ignored' lists them); fingerprint "
               f"{manifest['fingerprint'][:12]}")


if __name__ == "__main__":
    main()
