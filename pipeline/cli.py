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


def _register_commands() -> None:
    from pipeline.inspect import inspect_command

    cli.add_command(inspect_command, name="inspect")


_register_commands()
