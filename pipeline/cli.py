"""`python -m pipeline`: the user-facing commands (the DVC stages live in stages/)."""

import click

from pipeline.errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Decoupled-KL (IKL) distillation on long-tailed data with cached teacher logits.

    Run the pipeline with `dvc repro`; these commands inspect what it wrote.
    """


def run_stage(main):
    """Decorator for stage commands: a UserError exits with its one-line message."""
    import functools

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (UserError, FileNotFoundError) as error:
            raise click.ClickException(str(error)) from None

    return wrapper


@cli.command()
def presets() -> None:
    """Print the paper's ImageNet-LT runs as `dvc exp run` commands.

    First copy pipeline/presets/imagenet_lt.yaml over params.yaml and set its data paths.
    """
    from pipeline.presets import (BASE_PARAMS, IMAGENET_LT_BASELINES, IMAGENET_LT_ROWS,
                                  exp_run_command)

    click.echo(f"# params file: {BASE_PARAMS}")
    for arch, top1 in IMAGENET_LT_BASELINES.items():
        click.echo(f"# baseline {arch}: paper top-1 {top1:.2f}% (stage evaluate_teacher@{arch})")
    for name, (top1, _) in IMAGENET_LT_ROWS.items():
        paper = f"paper top-1 {top1:.2f}%" if top1 is not None else "no paper number"
        click.echo(f"# {name}: {paper}\n{exp_run_command(name)}")

    from pipeline.presets import GLYPHS_LT_PARAMS  # the embedded 100-class set, on CPU

    click.echo("\n# glyphs-LT: 100 characters rendered from bundled fonts, long-tailed; "
               "CPU only (about 19 CPU-minutes in all); nothing to download")
    click.echo(f"cp {GLYPHS_LT_PARAMS} params.yaml && dvc repro")


def _register_commands() -> None:
    from pipeline.inspect import inspect_command

    cli.add_command(inspect_command, name="inspect")


_register_commands()
