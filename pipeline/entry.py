"""What every stage script (stages/*.py) shares: -h and --help, user errors as one line, the
weights-folder check. Kept apart from the tools so a stage's import closure stays small."""

import functools
import os

import click

from pipeline.errors import UserError

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}  # click context_settings: -h and --help


def run_stage(main):
    """Decorator for stage commands: a UserError exits with its one-line message."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (UserError, FileNotFoundError) as error:
            _end_progress_bars()
            raise click.ClickException(str(error)) from None

    return wrapper


def _end_progress_bars() -> None:
    """Close the progress bars an error interrupted, so that each ends its line and the
    `Error:` line starts on its own (a bar left open keeps its line, after a carriage return)."""
    from tqdm import tqdm  # already imported by whatever drew a bar

    for bar in list(getattr(tqdm, "_instances", ())):  # tqdm's registry of open bars
        bar.close()


def check_tracked_weights(weights: str, folder: str, key_path: str) -> None:
    """A model's weights file must lie in `folder`, the folder dvc.yaml declares as the
    stage's dependency, so that DVC retrains when the file changes (a symlink there works)."""
    inside = os.path.abspath(weights).startswith(os.path.abspath(folder) + os.sep)
    if weights and not inside:
        raise UserError(f"{key_path}.weights: {weights} is outside {folder}/, the folder DVC "
                        f"tracks for this stage; move the file (or a symlink to it) there")
