"""`python -m pipeline`: the user-facing commands (the DVC stages live in stages/)."""

import click

from pipeline.entry import HELP_OPTIONS

@click.group(context_settings=HELP_OPTIONS)
def cli() -> None:
    """Decoupled-KL (IKL) distillation on long-tailed data with cached teacher logits.

    Run the pipeline with `dvc repro`; these commands inspect what it wrote.
    """


@cli.command()
def presets() -> None:
    """Print how to apply the smoke preset, and the official DKL ImageNet-LT runs, one per
    official script, as `dvc exp run` commands.

    For ImageNet-LT, first copy pipeline/tools/presets/imagenet_lt.yaml over params.yaml and set
    its data paths.
    """
    from pipeline.tools.presets import BASE_PARAMS, IMAGENET_LT_ROWS, describe, exp_run_command

    _echo_smoke()
    _echo_glyphs()
    click.echo("\n# the paper's ImageNet-LT table, one row per official script:")
    click.echo(f"# params file: {BASE_PARAMS}")
    for name in IMAGENET_LT_ROWS:
        click.echo(f"# {describe(name)}\n{exp_run_command(name)}")


def _echo_smoke() -> None:
    """How to apply the smoke preset (and undo it: it rewrites the committed results)."""
    from pipeline.tools.presets import SMOKE_PARAMS

    click.echo(f"# smoke test: every stage in tiny settings (about 46 s of CPU time):\n"
               f"#   cp {SMOKE_PARAMS} params.yaml && dvc repro\n"
               "#   undo: git checkout -- params.yaml dvc.lock results figures && dvc repro")


def _echo_glyphs() -> None:
    """How to apply the embedded 100-class preset."""
    from pipeline.tools.presets import GLYPHS_LT_PARAMS

    click.echo("\n# glyphs-LT: 100 characters rendered from bundled fonts, long-tailed; "
               "CPU only; nothing to download:\n"
               f"#   cp {GLYPHS_LT_PARAMS} params.yaml && dvc repro")


def _register_commands() -> None:
    from pipeline.tools.inspect import inspect_command

    cli.add_command(inspect_command, name="inspect")


_register_commands()
