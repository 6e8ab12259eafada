"""The run directory `<output_dir>/<name>/`: every file a run writes lies inside it.

`name` is a plain name (the schema refuses '/', '.' and '..'), and `output_dir` is the
user's own choice of parent. What is left is a link planted inside the run directory
(`checkpoints -> /somewhere/else`, say, in a shared runs folder): writing through it
would put files, or delete old checkpoints, outside the run. `open_run_directory`
refuses to start when any link under the run directory leads out of it.
"""

from __future__ import annotations

import os
from pathlib import Path

from configs.loading import ConfigError


def open_run_directory(output_dir: str, name: str, create: bool) -> Path:
    """`output_dir/name`, created when `create` (rank 0), after checking it for links
    that lead outside it."""
    run_dir = Path(output_dir) / name
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
    if run_dir.exists():
        check_confined(run_dir)
    return run_dir


def check_confined(run_dir: Path) -> None:
    """Raise ConfigError if a link anywhere under `run_dir` (the run directory itself
    included) resolves outside it."""
    # The run directory itself may be a link (runs/ on another disk): what counts is that
    # nothing inside it leads out of where it really is.
    root = run_dir.resolve()
    for directory, subdirs, files in os.walk(root, followlinks=False):
        for entry in subdirs + files:
            path = Path(directory) / entry
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                raise ConfigError(
                    f"{run_dir / path.relative_to(root)}: a link to {path.resolve()}, outside the run directory "
                    f"{run_dir}; a run writes only inside its directory (remove the link or choose another "
                    "output_dir/name)"
                )
