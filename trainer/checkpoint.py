"""Checkpoints: torch.distributed.checkpoint (DCP), written atomically, verified, the last K kept.

    <run_dir>/checkpoints/step-00000440/      complete checkpoints:
        __0_0.distcp ...                        DCP shards (tensors only)
        .metadata                               DCP's index of the shards (a pickle)
        config.yaml                             the run's config when it was written
        manifest.json                           written last: every file's size and SHA-256
    <run_dir>/checkpoints/.step-00000440.tmp  being written; never read

Every rank writes its own shards into the temporary directory; when all ranks are done
(a barrier) the files are hashed (each rank a share), rank 0 writes the manifest and
renames the directory. A rename is atomic, so a directory named `step-*` is always
complete when written: a job killed while writing leaves only a `.tmp` directory, which
the next save clears. DCP reshards on load, so a checkpoint written by N ranks resumes on M.

What a checkpoint directory is trusted for, and what not:
- Damage (a truncated, zeroed or deleted file, a garbage `.metadata`, a missing
  manifest) is found by the manifest before anything is read; resume then falls back to
  the newest checkpoint that verifies, with a warning naming the damaged one.
- Code is never run from it, even when someone rewrote the manifest to match: DCP reads
  `.metadata` with plain `pickle.load`, so it is read here through an unpickler that
  admits only the classes DCP's metadata is made of (`SafeFileSystemReader`), shards
  load with `torch.load(weights_only=True)` (`SafeLoadPlanner` also for non-tensor
  entries, which DCP would load with weights_only=False), and the config is YAML read
  with `safe_load`. A checkpoint that names anything else is refused, not skipped.

What goes in is the trainer's business (`Trainer.state_dict`); this module only knows
where checkpoints live and how to write, verify and read them safely.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import pickle
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
import yaml
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from trainer.distributed import Distributed

log = logging.getLogger(__name__)

PREFIX = "step-"
BEST_PREFIX = "best-"
MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"
MANIFEST_FORMAT = "nextrec-checkpoint/1"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permission denied, ...). Every
    complete checkpoint is still in place; the message names the newest."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: crafted (names a class a checkpoint never holds),
    damaged with no intact one to fall back to, or written under another config. The
    message is one line naming the file and what to do instead."""


# ------------------------------------------------------------- reading .metadata safely

# Everything DCP's metadata pickle is made of (torch.distributed.checkpoint.metadata and
# filesystem._StorageInfo), found by recording what unpickling real checkpoints of one
# and of several ranks looks up. Anything else in a `.metadata` was put there by hand.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout from its name
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only the metadata classes and torch dtypes; refuses every other global
    (os.system, builtins.eval, ...) before it is looked up, so nothing is called."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a checkpoint's metadata never holds")


def read_metadata(path: Path) -> Metadata:
    """DCP's `.metadata` of checkpoint `path`, read through the restricted unpickler and
    checked: a Metadata whose shard files all lie in the checkpoint directory itself."""
    file = Path(path) / ".metadata"
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file}: refused: {e} (crafted or damaged; nothing in it was run)") from None
    except Exception as e:  # garbage bytes fail in many ways; all mean "not DCP metadata"
        raise CheckpointError(f"{file}: not a DCP metadata file ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{file}: refused: holds a {type(metadata).__name__}, not DCP metadata")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{file}: refused: names shard file {name!r} outside the checkpoint directory")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by `read_metadata` above instead of
    `pickle.load`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata files: this project never writes them
            raise CheckpointError(f"{self.path}: refused: per-rank metadata files are not used by this trainer")
        metadata = read_metadata(Path(self.path))
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, except that non-tensor entries load with weights_only=True (DCP's
    own uses weights_only=False, which a crafted `.metadata` could steer any entry to)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"refused entry {read_item.dest_index.fqn}: not plain data ({_first_line(e)})"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


# ------------------------------------------------------------------- the manifest


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _describe_files(paths: list[Path], dist: Distributed) -> dict[str, dict]:
    """{name: {size, sha256}} of `paths`; each rank hashes every N-th file, so a sharded
    checkpoint is hashed in parallel and no rank reads all of it."""
    mine = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in paths[dist.rank :: dist.world_size]}
    described: dict[str, dict] = {}
    for part in dist.gather_objects(mine):
        described.update(part)
    return described


def _write_manifest(directory: Path, step: int, dist: Distributed, best_step: int | None = None) -> None:
    """Hash every file of `directory` (read back from disk) and write the manifest last;
    `best_step`: the best-model checkpoint this one goes with. Collective."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    described = _describe_files(files, dist)
    if dist.is_main:
        manifest = {"format": MANIFEST_FORMAT, "step": step, "files": described}
        if best_step is not None:
            manifest["best_step"] = best_step
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _verify(path: Path, dist: Distributed) -> str | None:
    """None when checkpoint `path` is as its manifest says (every file there, of the
    listed size and SHA-256, and no other); otherwise what is wrong, naming the file.
    Collective: the files are verified in shares."""
    problem = None
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        listed = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(listed, dict):
            raise ValueError(f"not a {MANIFEST_FORMAT} manifest")
    except FileNotFoundError:
        problem, listed = f"{path / MANIFEST}: missing (written last, so the checkpoint is incomplete or not ours)", {}
    except (ValueError, KeyError, TypeError, OSError) as e:
        problem, listed = f"{path / MANIFEST}: unreadable ({_first_line(e)})", {}
    if problem is None:
        present = sorted(p.name for p in path.iterdir() if p.name != MANIFEST)
        missing = sorted(set(listed) - set(present))
        extra = sorted(set(present) - set(listed))
        if missing:
            problem = f"{path / missing[0]}: missing ({len(missing)} listed file(s) not there)"
        elif extra:
            problem = f"{path / extra[0]}: not in the manifest (the directory was changed after it was written)"
    names = sorted(listed) if problem is None else []
    mine = []
    for name in names[dist.rank :: dist.world_size]:
        file, expected = path / name, listed[name]
        if not isinstance(expected, dict):
            mine.append(f"{path / MANIFEST}: its entry for {name} is not a size and hash")
            continue
        size = file.stat().st_size
        if size != expected.get("size"):
            mine.append(f"{file}: {size} bytes, the manifest says {expected.get('size')}")
        elif _sha256(file) != expected.get("sha256"):
            mine.append(f"{file}: contents differ from the manifest (SHA-256)")
    found = [p for part in dist.gather_objects(mine) for p in part]
    problem = problem or (found[0] if found else None)
    if problem is None and path.name.startswith(PREFIX):
        problem = _verify_best(path, manifest.get("best_step"), dist)
    return problem


def _verify_best(path: Path, best_step: object, dist: Distributed) -> str | None:
    """A step checkpoint resumes only together with the best model it names."""
    if best_step is None:
        return None
    if type(best_step) is not int or not 0 < best_step <= int(path.name[len(PREFIX):]):
        return f"{path / MANIFEST}: names best step {best_step!r}, not a step at or before its own"
    best = path.parent / best_name(best_step)
    best_problem = _verify(best, dist) if best.is_dir() else f"{best}: missing"
    return best_problem and f"its best model: {best_problem}"


def best_of(path: Path) -> Path | None:
    """The best-model checkpoint step checkpoint `path` names (verified with it), if any."""
    best_step = _named_best_step(path)
    return path.parent / best_name(best_step) if best_step else None


def _named_best_step(path: Path) -> object:
    """The `best_step` step checkpoint `path`'s manifest names (None if none)."""
    return json.loads((path / MANIFEST).read_text()).get("best_step")


def verified_checkpoint(directory: Path, dist: Distributed) -> Path | None:
    """The newest checkpoint under `directory` that verifies against its manifest, with a
    warning for every newer one that does not; None when there is none at all. Raises
    CheckpointError when checkpoints exist but none verifies. Collective."""
    found = complete_checkpoints(directory)
    damaged = []
    for path in reversed(found):
        problem = _verify(path, dist)
        if problem is None:
            for bad, why in damaged:
                log.warning("damaged checkpoint %s: %s; resuming from %s instead", bad.name, why, path.name)
            return path
        damaged.append((path, problem))
    if damaged:
        newest, why = damaged[0]
        raise CheckpointError(
            f"{newest}: damaged ({why}), and no older checkpoint under {directory} verifies either; "
            "start over with --overwrite"
        )
    return None


def written_config(path: Path) -> dict | None:
    """The config a checkpoint (or a run directory) was written under: its config.yaml
    read with safe_load, or None if it has none."""
    file = path / CONFIG_FILE
    if not file.exists():
        return None
    try:
        loaded = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        raise CheckpointError(f"{file}: not a readable config ({_first_line(e)})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{file}: not a config mapping")
    return loaded


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


def best_name(step: int) -> str:
    """The best model so far, written when validation improves at `step`."""
    return f"{BEST_PREFIX}{step:08d}"


def complete_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories (`step-<number>`), oldest first; whether each is intact is
    `_verify`'s question."""
    if not directory.is_dir():
        return []
    found = [
        p for p in directory.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint whose manifest is there (written last); not yet verified."""
    found = [p for p in complete_checkpoints(directory) if (p / MANIFEST).is_file()]
    return found[-1] if found else None


def save_checkpoint(
    directory: Path, step: int, state: dict, dist: Distributed, keep: int, config: dict | None = None,
    best_step: int | None = None,
) -> Path:
    """Write `state` (a DCP state dict) and `config` (the run's config, as a dict) as
    checkpoint `step`, its manifest last (naming `best_step`, the best model it goes
    with); keep the newest `keep`, and the best models they name. Collective: every rank
    calls it. Raises OSError (after leaving every complete checkpoint in place) when the
    write fails."""
    final = _write_atomically(directory, checkpoint_name(step), step, state, dist, config, best_step)
    if dist.is_main:
        # The checkpoint just written (hashed from disk) is never deleted, so the last
        # verified checkpoint survives even when newer-numbered directories are damaged.
        for old in complete_checkpoints(directory)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        _prune_best(directory, keep_also=best_step)
        log.info("checkpoint: %s", final)
    return final


def save_best(directory: Path, step: int, model_state: dict, dist: Distributed) -> Path:
    """Write the model as the best so far (`best-<step>`: DCP, atomic, with a manifest).
    Kept while a step checkpoint names it, and the newest always. Collective."""
    final = _write_atomically(directory, best_name(step), step, {"model": model_state}, dist)
    if dist.is_main:
        _prune_best(directory, keep_also=step)
    return final


def load_best(path: Path, model_state: dict, dist: Distributed) -> None:
    """Read the best model of checkpoint `path` (`best-<step>`) into `model_state` in place."""
    load_checkpoint(path, {"model": model_state}, dist)


def _prune_best(directory: Path, keep_also: int | None) -> None:
    """Remove the best models no step checkpoint names (rank 0). `keep_also`: the newest
    best step, kept whatever the step checkpoints say."""
    named = {keep_also}
    for checkpoint in complete_checkpoints(directory):
        try:
            named.add(_named_best_step(checkpoint))
        except (OSError, ValueError):
            continue  # a damaged checkpoint names nothing it could be resumed with
    for best in directory.glob(f"{BEST_PREFIX}*"):
        suffix = best.name[len(BEST_PREFIX):]
        if best.is_dir() and suffix.isdigit() and int(suffix) not in named:
            shutil.rmtree(best, ignore_errors=True)


def _write_atomically(
    directory: Path, name: str, step: int, state: dict, dist: Distributed, config: dict | None = None,
    best_step: int | None = None,
) -> Path:
    final = directory / name
    if dist.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        for prefix in (PREFIX, BEST_PREFIX):
            for stale in directory.glob(f".{prefix}*.tmp"):  # left by a killed write
                shutil.rmtree(stale, ignore_errors=True)
    try:
        with atomic_directory(final, dist) as tmp, _single_process_quiet():
            dcp.save(_in_row_pieces(state), checkpoint_id=tmp, no_dist=not dist.enabled)
            if dist.is_main and config is not None:
                (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
            dist.barrier()
            _write_manifest(tmp, step, dist, best_step)
    # DCP reports a failed write on any rank to every rank as a CheckpointException
    # (a BaseException, not an OSError); a single process may see the OSError itself.
    except (OSError, CheckpointException) as e:
        previous = latest_checkpoint(directory)
        raise CheckpointWriteError(
            f"{final}: writing the checkpoint failed ({_first_line(e)}); "
            + (f"the previous checkpoint {previous} is intact, " if previous else "no earlier checkpoint exists, ")
            + "rerun with --resume once the cause is fixed"
        ) from e
    return final


# The most bytes DCP copies at once when it writes a view of a larger tensor. Each
# piece's copy is resident while it is written, and two were at once: with 64 MB pieces
# a checkpoint's write put 0.13 GB on each rank's peak, which it set (bench/scale.py's
# log on 2 ranks, traced: 2.88 GB against 2.79 in training); 16 MB pieces add 0.02 GB,
# in the same 5.8 s.
PIECE_BYTES = 16 * 2**20


def _in_row_pieces(state):
    """`state` with every sharded tensor whose local shards exceed PIECE_BYTES cut into
    pieces of rows of at most that. DCP writes a view of a larger tensor by copying it
    first, and TorchRec keeps a rank's tables in one flat buffer: the copy of a rank's
    1.28 GB table shard (1e7 x D 64 on 2 ranks) was the run's peak memory. A piece is
    copied, written and dropped before the next. The checkpoint lists more chunks, which
    DCP reads back into any sharding."""
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata

    if isinstance(state, dict):
        return {key: _in_row_pieces(value) for key, value in state.items()}
    if not isinstance(state, ShardedTensor) or state.dim() != 2:
        return state
    # Decided from the global layout, the same on every rank: the re-sharding below is
    # collective, and a rank holding no shard (a table-wise table) or a smaller one must
    # join it all the same.
    metadata = state.metadata()
    row_bytes = state.size(1) * metadata.tensor_properties.dtype.itemsize
    if all(meta.shard_sizes[0] * row_bytes <= PIECE_BYTES for meta in metadata.shards_metadata):
        return state
    shards = state.local_shards()
    pieces = []
    for shard in shards:
        meta, tensor = shard.metadata, shard.tensor
        step = max(1, PIECE_BYTES // max(tensor.stride(0) * tensor.element_size(), 1))
        for start in range(0, tensor.shape[0], step):
            rows = tensor[start : start + step]
            offsets = [meta.shard_offsets[0] + start, meta.shard_offsets[1]]
            pieces.append(Shard(rows, ShardMetadata(offsets, list(rows.shape), meta.placement)))
    # Collective (it agrees the global layout): every rank writes the same state keys.
    return ShardedTensor._init_from_local_shards(pieces, *state.size(), process_group=state._process_group)


def checkpoint_keys(path: Path) -> set[str]:
    """The (flattened) state keys checkpoint `path` holds, read through the restricted
    unpickler."""
    return set(read_metadata(path).state_dict_metadata)


def optimizer_state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A dense optimizer's state tensors, keyed by parameter name (DCP's form). Tensors
    only: the param groups (learning rates, betas) come from the config, and DCP reads
    lists back unlike it writes them across world sizes (measured: "missing key ...
    param_groups")."""
    return get_optimizer_state_dict(model, optimizer)["state"]


def load_optimizer_state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    groups = get_optimizer_state_dict(model, optimizer)["param_groups"]
    set_optimizer_state_dict(model, optimizer, optim_state_dict={"state": state, "param_groups": groups})


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_checkpoint(path: Path, state: dict, dist: Distributed) -> None:
    """Read checkpoint `path` into `state` in place (DCP: each rank reads what its own
    tensors hold, whatever the world size that wrote it), never unpickling anything but
    DCP's metadata classes. Verify it first (`verified_checkpoint`)."""
    if not (path / ".metadata").exists():
        raise CheckpointError(f"{path}: not a complete checkpoint (no .metadata)")
    read_metadata(path)  # refused here in one line, not inside DCP (which would retry and log tracebacks)
    with _single_process_quiet():
        try:
            dcp.load(
                state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(),
                no_dist=not dist.enabled,
            )
        except CheckpointException as e:
            # DCP wraps every rank's failure; a refusal of ours inside stays a refusal.
            refused = [exc for exc, _ in e.failures.values() if isinstance(exc, CheckpointError)]
            if refused:
                raise refused[0] from None
            first = next(iter(e.failures.values()))[0]
            raise CheckpointError(
                f"{path}: does not load into this model ({type(first).__name__}: {_first_line(first)})"
            ) from None
