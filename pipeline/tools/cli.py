"""`ikl-pipeline` / `python -m pipeline`: the user-facing commands (the DVC stages live in
stages/). `--help` lists every command with a one-line `short_help`; each command's own `--help`
says the rest."""

import click

from pipeline.entry import HELP_OPTIONS

# Default path of the offline plots template: .dvc/config names it (plots.html_template, a
# path relative to .dvc/), and the figures stage writes it there.
PLOTS_TEMPLATE = ".dvc/plots_template.html"


@click.group(context_settings={**HELP_OPTIONS, "max_content_width": 100})
def cli() -> None:
    """Decoupled-KL (IKL) distillation on long-tailed data with cached teacher logits.

    Run the pipeline with `dvc repro` (README.md); these commands show what it wrote and what
    to run next.
    """


@cli.command(short_help="Print the smoke, glyphs-LT and paper (ImageNet-LT) presets.")
def presets() -> None:
    """Print how to apply the smoke preset and the glyphs-LT preset, and the official DKL
    ImageNet-LT runs, one per official script, as `dvc exp run` commands.

    For ImageNet-LT, first copy pipeline/tools/presets/imagenet_lt.yaml over params.yaml and set
    its data paths (docs/reproducing-the-paper.md).
    """
    from pipeline.tools.presets import BASE_PARAMS, IMAGENET_LT_ROWS, describe, exp_run_command

    _echo_smoke()
    _echo_glyphs()
    click.echo("\n# the paper's ImageNet-LT table, one row per official script; first apply the "
               "preset and set data.root and the split lists' paths (docs/reproducing-the-paper.md):\n"
               f"#   cp {BASE_PARAMS} params.yaml")
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


@cli.command("plots-template",
             short_help="Write the offline page template `dvc plots show` uses.")
@click.option("--out", default=PLOTS_TEMPLATE, show_default=True,
              type=click.Path(dir_okay=False),
              help="Where to write it; .dvc/config's plots.html_template names the default.")
def plots_template_command(out: str) -> None:
    """Write DVC's plots page template with vega, vega-lite and vega-embed inlined (from
    vl-convert-python), so the page `dvc plots show` writes draws without internet.

    The figures stage of `dvc repro` writes it too; run this after deleting it or upgrading
    vl-convert-python."""
    from pipeline.tools.plots_template import write_plots_template

    path = write_plots_template(out)
    click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB); "
               "`dvc plots show` now writes a page that needs no network")


def _register_commands() -> None:
    from pipeline.tools.inspect import inspect_command

    cli.add_command(inspect_command, name="inspect")


_register_commands()
