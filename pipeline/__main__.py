from pipeline.tools.cli import cli

cli()
