"""The run directory `<output_dir>/<name>/`: every file a run writes lies inside it, and
one run at a time writes there.

- Confinement. `name` is a plain name (the schema refuses '/', '.' and '..'), and
  `output_dir` is the user's own choice of parent. What is left is a link planted inside
  the run directory (`checkpoints -> /somewhere/else`, say, in a shared runs folder):
  writing through it would put files, or delete old checkpoints, outside the run.
  `open_run_directory` refuses to start when any link under the run directory leads out.
- One run at a time (`RunLock`). Rank 0 holds an exclusive `flock` on `<run>/.lock` for
  the whole run; the kernel releases it when the process ends, however it ends, so a
  lock left by a killed process is simply taken over (and said so). A second process on
  the same directory refuses with one line naming the holder's PID.
- No mixing (`check_fresh_start`). A new run (no `--resume`) into a directory that holds
  another run's files is refused, naming `--resume` and `--overwrite`; `--overwrite`
  clears it first. `--resume` is refused when the checkpoint (or the finished run) was
  written under another config, naming the keys that differ (`config_difference`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path

import yaml

from configs.loading import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
# What a run leaves in its directory that is worth keeping: any of these means the
# directory holds a run (a checkpoint, the results, the exported model).
RUN_FILES = ("results.json", "checkpoints", "model")
# What a run that stopped before any checkpoint leaves (and a new run replaces); the
# prepared dataset (`prepared/`) is data, reused by any run of the same data config.
LEFTOVER_FILES = ("config.yaml", "results.md", "tensorboard")
# Keys a resumed run may change: they extend the run, or say how it runs (speed, where,
# how often it logs), never what it computes. Everything else must match the checkpoint.
RESUMABLE_KEYS = (
    "name", "output_dir", "train.max_steps", "train.max_epochs", "train.patience", "train.resume",
    "train.overwrite", "train.keep_checkpoints", "train.log_every_steps", "train.num_threads",
    "train.release_memory_every_steps", "loader.num_workers",
    "eval.query_chunk_size", "eval.candidate_chunk_size", "eval.max_held_vectors_gb", "loader.batch_size",
    "distributed.backend", "distributed.sharding",
    "data.prepared_path", "baselines",
)


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


class RunLock:
    """An exclusive lock of a run directory for one process (rank 0), held until
    `release` or the process's end. The file holds the holder's PID while it is held and
    is emptied on release, so a PID found in it on taking the lock is a process that died
    holding it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise ConfigError naming the directory and the holder's PID."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise ConfigError(
                f"{self.path.parent}: another run is using this directory (PID {holder or 'unknown'} holds "
                f"{self.path}); wait for it to end, or choose another name (name=...)"
            ) from None
        previous = _read_pid(fd)
        if previous and previous != os.getpid():
            log.warning("%s: took over the lock of PID %s, which ended without releasing it", self.path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # emptied first: a PID left behind means a crash
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read_pid(fd: int) -> str:
    text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    return text if text.isdigit() else ""


def existing_run_files(run_dir: Path) -> list[str]:
    """The files and folders of an earlier run in `run_dir`, in RUN_FILES order (an empty
    checkpoints folder holds nothing)."""
    found = []
    for name in RUN_FILES:
        path = run_dir / name
        if name == "checkpoints":
            if path.is_dir() and any(p.name.startswith(("step-", "best-")) for p in path.iterdir()):
                found.append(name)
        elif path.exists():
            found.append(name)
    return found


def check_fresh_start(run_dir: Path, overwrite: bool) -> None:
    """Before a run that does not resume: refuse a directory holding another run, or,
    with `overwrite`, clear it; what a run that stopped early left is cleared either way.
    The prepared dataset and the lock stay. Rank 0, holding the lock."""
    found = existing_run_files(run_dir)
    if found and not overwrite:
        raise ConfigError(
            f"{run_dir}: already holds a run ({', '.join(found)}); continue it with --resume, "
            "replace it with --overwrite, or choose another name (name=...)"
        )
    if found:
        log.warning("%s: --overwrite: removing the earlier run's %s", run_dir, ", ".join(found))
    leftovers = [name for name in LEFTOVER_FILES if (run_dir / name).exists()]
    if leftovers and not found:
        log.info("%s: removing what a run that stopped before its first checkpoint left: %s", run_dir,
                 ", ".join(leftovers))
    for name in found + leftovers:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def config_difference(written: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between a checkpoint's config and this run's,
    leaving out RESUMABLE_KEYS; each as `key: old -> new`."""
    # Through YAML both ways, so the written and the live config compare alike (tuples, floats).
    old, new = _flatten(written), _flatten(yaml.safe_load(yaml.safe_dump(current, sort_keys=False)))
    differing = []
    for key in sorted(set(old) | set(new)):
        if key in RESUMABLE_KEYS or any(key.startswith(k + ".") for k in RESUMABLE_KEYS):
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            differing.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    return differing


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
