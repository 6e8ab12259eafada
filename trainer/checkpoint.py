"""Checkpoints: torch.distributed.checkpoint (DCP), written atomically, the last K kept.

    <run_dir>/checkpoints/step-00000440/      complete checkpoints (DCP files + .metadata)
    <run_dir>/checkpoints/.step-00000440.tmp  being written; never read

Every rank writes its own shards into the temporary directory; when all ranks are done
(a barrier) rank 0 renames it. A rename is atomic, so a directory named `step-*` is
always complete: a job killed while writing leaves only a `.tmp` directory, which the
next save clears. DCP reshards on load, so a checkpoint written by N ranks resumes on M.

What goes in is the trainer's business (`Trainer.state_dict`); this module only knows
where checkpoints live and how to write and read them safely.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from trainer.distributed import Distributed

log = logging.getLogger(__name__)

PREFIX = "step-"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permission denied, ...). Every
    complete checkpoint is still in place; the message names the newest."""


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns at every call in one process that it assumes one process, which is what
    no_dist=True asks for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


@contextlib.contextmanager
def atomic_directory(final: Path, dist: Distributed) -> Iterator[Path]:
    """A temporary directory beside `final` for every rank to write into; once every rank
    is done, rank 0 puts it in the place of `final` (the previous one moved aside first,
    then removed). A rename is atomic, so `final` is always either the old directory or
    the complete new one. If the write raises, nothing is renamed. Collective."""
    tmp, old = final.parent / f".{final.name}.tmp", final.parent / f".{final.name}.old"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    yield tmp
    dist.barrier()
    if dist.is_main:
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.replace(old)
        tmp.replace(final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / ".metadata").exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(directory: Path) -> Path | None:
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(directory: Path, step: int, state: dict, dist: Distributed, keep: int) -> Path:
    """Write `state` (a DCP state dict) as checkpoint `step`; keep the newest `keep`.
    Collective: every rank calls it. Raises OSError (after leaving every complete
    checkpoint in place) when the write fails."""
    final = directory / checkpoint_name(step)
    if dist.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(f".{PREFIX}*.tmp"):  # left by a killed write
            shutil.rmtree(stale, ignore_errors=True)
    try:
        with atomic_directory(final, dist) as tmp, _single_process_quiet():
            dcp.save(state, checkpoint_id=tmp, no_dist=not dist.enabled)
    # DCP reports a failed write on any rank to every rank as a CheckpointException
    # (a BaseException, not an OSError); a single process may see the OSError itself.
    except (OSError, CheckpointException) as e:
        previous = latest_checkpoint(directory)
        raise CheckpointWriteError(
            f"{final}: writing the checkpoint failed ({_first_line(e)}); "
            + (f"the previous checkpoint {previous} is intact, " if previous else "no earlier checkpoint exists, ")
            + "rerun with --resume once the cause is fixed"
        ) from e
    if dist.is_main:
        for old in complete_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint: %s", final)
    return final


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_checkpoint(path: Path, state: dict, dist: Distributed) -> None:
    """Read checkpoint `path` into `state` in place (DCP: each rank reads what its own
    tensors hold, whatever the world size that wrote it)."""
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no .metadata)")
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=path, no_dist=not dist.enabled)
