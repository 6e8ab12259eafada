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
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trainer.checkpoint import atomic_directory
from trainer.distributed import Distributed

EXPORT_DIR = "model"


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
    """The exported state as whole plain tensors, whatever number of ranks wrote it."""
    directory = run_dir / EXPORT_DIR
    files = sorted(directory.glob("rank-*.pt"))
    if not files:
        raise FileNotFoundError(f"{directory}: no exported model (rank-*.pt); train first with python -m trainer.main")
    state: dict[str, torch.Tensor] = {}
    written: dict[str, int] = {}
    for path in files:
        saved = torch.load(path, weights_only=True)
        state.update(saved["tensors"])
        for piece in saved["pieces"]:
            key, tensor = piece["key"], piece["tensor"]
            if key not in state:
                state[key] = torch.empty(piece["shape"], dtype=tensor.dtype)
            window = tuple(slice(o, o + n) for o, n in zip(piece["offsets"], tensor.shape))
            state[key][window] = tensor
            written[key] = written.get(key, 0) + tensor.numel()
    incomplete = [key for key, count in written.items() if count != state[key].numel()]
    if incomplete:
        raise ValueError(f"{directory}: the pieces of {incomplete} do not cover the tables exactly; export again")
    return state
