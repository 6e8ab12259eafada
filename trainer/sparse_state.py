"""The ID tables' optimizer state in one checkpoint layout, however the run was launched.

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

# torch / TorchRec state names -> FBGEMM's (the fused kernels' names).
_CANONICAL = {"sum": "momentum1", "exp_avg": "momentum1", "exp_avg_sq": "momentum2", "step": "step"}
KEY = "sparse_optimizer"


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

    def loaded(self) -> None:
        """Hand the state, loaded in place into `entries()`, back to the optimizers."""
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(self._state[name])
