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
    """Print the official DKL ImageNet-LT runs, one per official script, as commands.

    First copy pipeline/presets/imagenet_lt.yaml over params.yaml and set its data paths.
    """
    from pipeline.presets import BASE_PARAMS, IMAGENET_LT_ROWS, describe, exp_run_command

    click.echo(f"# params file: {BASE_PARAMS}")
    for name in IMAGENET_LT_ROWS:
        click.echo(f"# {describe(name)}\n{exp_run_command(name)}")


def _register_commands() -> None:
    from pipeline.inspect import inspect_command

    cli.add_command(inspect_command, name="inspect")


_register_commands()
