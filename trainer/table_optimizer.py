"""The ID tables' optimizer: chosen from the config, run inside backward (fused by DMP
when the tables are sharded), and its state in one checkpoint layout, however the run
was launched.

A plain process runs each table's optimizer inside backward (torch / TorchRec classes,
state per parameter: `sum` [rows, 1] for row-wise Adagrad, `exp_avg` for Adam ...); a
torchrun launch, even of one rank, runs TorchRec's fused kernels (one optimizer, state
`<table>.momentum1` as sharded tensors). Written as they are, a checkpoint of one
launch would not load into the other. So both are written under FBGEMM's names, one
entry per table and state, the row-wise sum flattened to [rows]:

    sparse_optimizer.<table>.momentum1     [rows] (row-wise Adagrad) or [rows, D]
    sparse_optimizer.<table>.momentum2     [rows, D] (Adam only)
    sparse_optimizer.<table>.step          [] (plain process only: torch's step count)

and DCP reshards them like the tables. The entries are views of the live state, so a
load writes into the optimizers in place; `SparseOptimizerState.loaded` finishes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from configs.schema import OptimConfig
from trainer.checkpoint import CheckpointError
from trainer.distributed import Distributed

# torch / TorchRec state names -> FBGEMM's (the fused kernels' names).
_CANONICAL = {"sum": "momentum1", "exp_avg": "momentum1", "exp_avg_sq": "momentum2", "step": "step"}
KEY = "sparse_optimizer"


@torch.no_grad()
def _materialise_state(optimizer: torch.optim.Optimizer) -> None:
    """Create an optimizer's lazily made state (a step with zero gradients at lr 0, which
    moves nothing), so a checkpoint has tensors to load into before the first step."""
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in params:
        p.grad = None
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


def _sparse_optimizer(config: OptimConfig) -> tuple[type, dict]:
    """The optimizer class applied in backward to the ID tables. DMP turns each into the
    matching fused FBGEMM kernel when it shards the tables; unsharded, the class itself
    runs. So Adagrad and Adam are torch's own: torchrec.optim.Adagrad / Adam are only
    placeholders for the fused kernels and raise NotImplementedError on an unsharded
    table, while its RowWiseAdagrad has a Python step of its own."""
    import torchrec.optim as sparse

    return {
        "rowwise_adagrad": (sparse.RowWiseAdagrad, {"lr": config.sparse_lr}),
        "adagrad": (torch.optim.Adagrad, {"lr": config.sparse_lr}),
        "adam": (torch.optim.Adam, {"lr": config.sparse_lr}),
    }[config.sparse_optimizer]


def attach_table_optimizer(model: nn.Module, config: OptimConfig) -> None:
    """Give the model's ID tables their optimizer, run inside backward (before sharding:
    DMP then fuses it into the sharded tables' kernels)."""
    optimizer_class, kwargs = _sparse_optimizer(config)
    apply_optimizer_in_backward(optimizer_class, model.embeddings.parameters(), kwargs)


def table_optimizers(model: nn.Module, task: nn.Module, dist: Distributed) -> dict[str, torch.optim.Optimizer]:
    """The ID tables' optimizers: TorchRec's fused one when sharded (`task`, the DMP
    wrapper), else the per-table optimizers that run inside backward, their lazily made
    state created."""
    if dist.enabled:
        return {"fused": task.fused_optimizer}
    optimizers = {name: p._in_backward_optimizers[0] for name, p in model.embeddings.named_parameters()}
    for optimizer in optimizers.values():
        _materialise_state(optimizer)
    return optimizers


@dataclass
class SparseOptimizerState:
    optimizers: dict[str, torch.optim.Optimizer]
    """Plain: {parameter name: its in-backward optimizer}; fused: {"fused": the optimizer}."""
    fused: bool

    def __post_init__(self) -> None:
        self._state = {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def entries(self) -> dict[str, dict[str, torch.Tensor]]:
        """{table: {state name: tensor}}: views of the optimizers' state."""
        entries: dict[str, dict[str, torch.Tensor]] = {}
        for parameter, optimizer_state in self._state.items():
            for key, per_parameter in optimizer_state["state"].items():
                for name, value in per_parameter.items():
                    if self.fused:  # key: the table's parameter; name: "<table>.momentum1"
                        table, state_name = name.split(".", 1)
                    else:  # key: the parameter's index (one per optimizer); name: torch's
                        table, state_name = parameter.rsplit(".", 2)[-2], _CANONICAL.get(name, name)
                        if name == "sum" and value.dim() == 2 and value.shape[1] == 1:
                            value = value.view(-1)  # row-wise: one number a row, as FBGEMM keeps it
                    entries.setdefault(table, {})[state_name] = value
        return entries

    def to_load(self, written: set[str], path) -> dict:
        """{state key: entries} to read from checkpoint `path`, which holds the keys
        `written`: the one layout, less torch's step count where a fused run wrote it; or,
        for a checkpoint written before the one layout (`sparse_optimizers`), each
        optimizer's own state, which loads into the launch mode that wrote it."""
        if any(key.startswith("sparse_optimizers.") for key in written):
            return {"sparse_optimizers": {name: state["state"] for name, state in self._state.items()}}
        entries = self.entries()
        for table, states in entries.items():
            for name in [n for n in states if f"{KEY}.{table}.{n}" not in written]:
                if name != "step":
                    raise CheckpointError(
                        f"{path}: holds no {name!r} state for table {table!r}: written with another "
                        "optim.sparse_optimizer; resume with the one that wrote it"
                    )
                del states[name]  # written fused: torch's step count is not kept there
        return {KEY: entries}

    def loaded(self) -> None:
        """Hand the state, loaded in place into `entries()`, back to the optimizers."""
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(self._state[name])
