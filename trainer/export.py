"""The trained model as plain tensors, for serving without TorchRec sharding.

    runs/<name>/model/rank-00000.pt    dense parameters, unsharded tables, rank 0's shards
                      rank-00001.pt    rank 1's shards of the sharded tables
                      ...

Every rank writes the pieces of the sharded tables it holds, so no rank ever gathers a
whole table (a 1e7-row table stays split while it is exported). The loader stitches the
pieces into whole tensors and checks that they add up to every table's size. The
directory is written under a temporary name and renamed by rank 0 once every rank has
finished (trainer/checkpoint.py `atomic_directory`), so a crash leaves the previous
export intact, never a partial one. Files hold tensors, ints and strings only, and load
with `torch.load(weights_only=True)`: no pickled code is ever executed.

A file that does not load that way (damaged, truncated, or crafted to run code), or that
loads but is not laid out as below, raises `ExportError` naming the file; the only fix
offered is to train the run again, never to load it less safely.

    {"tensors": {key: Tensor},                  whole tensors (rank 0 only)
     "pieces": [{"key": str, "shape": [int], "offsets": [int], "tensor": Tensor}]}
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from trainer.checkpoint import atomic_directory
from trainer.distributed import Distributed

EXPORT_DIR = "model"


class ExportError(ValueError):
    """The exported model is missing, unreadable, or not one this project wrote. The
    message is one line naming the file and what to do."""


def export_model(model: nn.Module, run_dir: Path, dist: Distributed) -> Path:
    """Write `run_dir/model/`. Collective: every rank must call it."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    whole: dict[str, torch.Tensor] = {}
    pieces: list[dict] = []
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                pieces.append({
                    "key": key, "shape": list(value.size()), "offsets": list(shard.metadata.shard_offsets),
                    "tensor": shard.tensor.detach().cpu(),
                })
        elif dist.is_main:  # replicated on every rank: rank 0 writes it
            whole[key] = value.detach().cpu()
    with atomic_directory(run_dir / EXPORT_DIR, dist) as tmp:
        torch.save({"tensors": whole, "pieces": pieces}, tmp / f"rank-{dist.rank:05d}.pt")
    return run_dir / EXPORT_DIR


def load_exported(run_dir: Path) -> dict[str, torch.Tensor]:
    """The exported state as whole plain tensors, whatever number of ranks wrote it.
    Raises `ExportError` for a missing, unreadable, damaged or crafted export."""
    directory = run_dir / EXPORT_DIR
    files = sorted(directory.glob("rank-*.pt"))
    if not files:
        raise ExportError(f"{directory}: no exported model (rank-*.pt); train first with python -m trainer.main")
    state: dict[str, torch.Tensor] = {}
    written: dict[str, int] = {}
    for path in files:
        saved = _read(path, run_dir)
        state.update(saved["tensors"])
        for piece in saved["pieces"]:
            key, tensor = piece["key"], piece["tensor"]
            if key not in state:
                state[key] = torch.empty(piece["shape"], dtype=tensor.dtype)
            elif list(state[key].shape) != piece["shape"]:
                raise _not_ours(path, run_dir, f"a piece of {key!r} disagrees with the others on its shape")
            window = tuple(slice(o, o + n) for o, n in zip(piece["offsets"], tensor.shape))
            state[key][window] = tensor
            written[key] = written.get(key, 0) + tensor.numel()
    incomplete = [key for key, count in written.items() if count != state[key].numel()]
    if incomplete:
        raise ExportError(f"{directory}: the pieces of {incomplete} do not cover the tables exactly; export again")
    return state


def _read(path: Path, run_dir: Path) -> dict:
    """One rank's file, checked to be laid out as the module docstring says."""
    try:
        with warnings.catch_warnings():
            # torch.save writes pickle protocol 2; another protocol means a file written some
            # other way, about to be refused below: its warning would only add noise.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            saved = torch.load(path, weights_only=True, map_location="cpu")
    except OSError as e:
        raise ExportError(f"{path}: cannot read it ({e.strerror or e})") from None
    except Exception:
        # weights_only=True refused the file (code or objects in the pickle: UnpicklingError),
        # or it is not a readable torch file at all (RuntimeError, EOFError). torch's own
        # message suggests weights_only=False, which would run whatever the file holds: it
        # is deliberately not passed on.
        raise _not_ours(path, run_dir, "it does not load as plain tensors") from None
    if not (isinstance(saved, dict) and isinstance(saved.get("tensors"), dict) and isinstance(saved.get("pieces"), list)):
        raise _not_ours(path, run_dir, "expected a dict with 'tensors' (a dict) and 'pieces' (a list)")
    for key, tensor in saved["tensors"].items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise _not_ours(path, run_dir, f"'tensors' maps {key!r} to {type(tensor).__name__}, not a tensor")
    for number, piece in enumerate(saved["pieces"]):
        if not _is_piece(piece):
            raise _not_ours(path, run_dir, f"piece {number} is not a {{key, shape, offsets, tensor}} inside its table")
    return saved


def _is_piece(piece: object) -> bool:
    """A dict naming a table, its whole shape, and a tensor that lies inside it at `offsets`."""
    if not isinstance(piece, dict):
        return False
    key, shape, offsets, tensor = piece.get("key"), piece.get("shape"), piece.get("offsets"), piece.get("tensor")
    if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
        return False
    if not all(isinstance(v, list) and all(type(n) is int and n >= 0 for n in v) for v in (shape, offsets)):
        return False
    return len(shape) == len(offsets) == tensor.dim() and all(
        o + n <= s for o, n, s in zip(offsets, tensor.shape, shape)
    )


def _not_ours(path: Path, run_dir: Path, why: str) -> ExportError:
    return ExportError(
        f"{path}: not a model file this project wrote (damaged or crafted: {why}); nothing in it was run. "
        "Write the export again by training the run: "
        f"python -m trainer.main --config {run_dir / 'config.yaml'} --overwrite"
    )
