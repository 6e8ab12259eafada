"""Everything about running on several ranks, in one place.

    dist = init_distributed(config.distributed)   # from the torchrun / torchx environment
    task = shard_model(model, dist, config.distributed)   # DMP: sharded tables, DDP towers
    output = task(batch)                           # model.train_forward on this rank's batch

One process a rank; gloo on CPU, NCCL on GPU. A process started without the torchrun
environment (tests, laptop runs) gets the single-process `Distributed` and the plain
model: nothing here is then called across processes. A torchrun launch of one rank
still shards (onto that rank) so that it runs the same fused table kernels as N ranks.

Gradients are exact, not approximately scaled: each rank's loss is its share of the
global mean (sum over its examples / global count, `Distributed.sum`), the dense
gradients are *summed* over ranks (a DDP comm hook; DDP would otherwise average), and
so are the ID tables' gradients (TorchRec's gradient division turned off). So N ranks with batch B give
the gradients of one process with batch N * B (tests/trainer/test_distributed.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from configs.names import TARGET_TABLE
from configs.schema import DistributedConfig

if TYPE_CHECKING:
    from data.sequences import TargetStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launched: bool = False
    """Started by torchrun / torchx (even as one rank): the tables are sharded by DMP and
    use TorchRec's fused kernels, so 1 rank and N ranks compute alike."""
    gather_group: object | None = None
    """Process group of the in-batch gather, apart from TorchRec's: collectives of one
    group must run in the same order on every rank, and nothing guarantees that autograd
    orders the gather's backward and TorchRec's embedding all-to-all alike everywhere."""

    @property
    def enabled(self) -> bool:
        return self.launched

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's tensor along dim 0, in rank order; gradients flow back
        to the rank that produced each part. Every rank must pass the same shape."""
        if self.world_size == 1:
            return tensor
        return _GatherWithGradient.apply(tensor.contiguous(), self.gather_group, self.rank, self.world_size)

    # sum, max and gather_varying take tensors where their callers hold them (counts and
    # IDs from numpy on the CPU, log q, the loss's counts) and communicate on `device`:
    # NCCL moves CUDA tensors only, gloo CPU ones. On the CPU the moves are no-ops.

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, without gradient (counts, logged values), on `tensor`'s device."""
        if self.world_size == 1:
            return tensor
        total = tensor.detach().to(self.device, copy=True)
        torch_dist.all_reduce(total)
        return total.to(tensor.device)

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Maximum over ranks, without gradient, on `tensor`'s device."""
        if self.world_size == 1:
            return tensor
        result = tensor.detach().to(self.device, copy=True)
        torch_dist.all_reduce(result, op=torch_dist.ReduceOp.MAX)
        return result.to(tensor.device)

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def gather_varying(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` concatenated along dim 0 in rank order, on every rank,
        when the ranks hold different numbers of rows (no gradient)."""
        return self.gather_varying_with_sizes(tensor)[0]

    def gather_varying_with_sizes(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`gather_varying`, and the [world_size] int64 rows each rank gave (on the CPU): the
        sizes are exchanged to gather anyway, so a caller placing its own rows needs no
        collective of its own."""
        if self.world_size == 1:
            return tensor, torch.tensor([tensor.shape[0]], dtype=torch.int64)
        sizes = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        sizes[self.rank] = tensor.shape[0]
        torch_dist.all_reduce(sizes)
        sizes = sizes.cpu()
        padded = torch.zeros((int(sizes.max()), *tensor.shape[1:]), dtype=tensor.dtype, device=self.device)
        padded[: tensor.shape[0]] = tensor.detach()
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, padded)
        return torch.cat([part[: int(size)] for part, size in zip(parts, sizes)]).to(tensor.device), sizes

    def gather_objects(self, value: object) -> list:
        """Every rank's `value` (picklable, small), in rank order, on every rank. The
        values come from this job's own ranks, never from a file."""
        if not self.enabled:
            return [value]
        values: list = [None] * self.world_size
        torch_dist.all_gather_object(values, value)
        return values


class _GatherWithGradient(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of the gathered tensor and
    keeps this rank's rows (an all-reduce: gloo has no reduce-scatter). Written here
    because torch.distributed.nn.functional.all_gather gave wrong candidate-tower
    gradients in this model on gloo (measured against one process: off by the size of
    the gradient; with this function they agree to 1e-6)."""

    @staticmethod
    def forward(ctx, tensor, group, rank, world_size):
        ctx.group, ctx.rank, ctx.rows = group, rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        torch_dist.all_gather(parts, tensor, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch_dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None, None, None


def init_distributed(config: DistributedConfig) -> Distributed:
    """Join the process group torchrun / torchx describe in the environment (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a single process without it."""
    if "RANK" not in os.environ:
        _record_baseline_rss()
        return Distributed()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = config.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend, **_restart_scoped_store(rank, world_size))
    dist = Distributed(
        rank=rank, world_size=world_size, local_rank=local_rank, device=device, launched=True,
        gather_group=torch_dist.new_group(backend=backend),
    )
    _record_baseline_rss()
    return dist


_BASELINE_RSS_GB: list[float] = []


def _record_baseline_rss() -> None:
    """The process's resident memory once the libraries are imported and the process group
    is up, before any data: what a rank costs whatever its share (reported beside the peak)."""
    if not _BASELINE_RSS_GB:
        _BASELINE_RSS_GB.append(current_rss_gb())


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (VmHWM), in GB."""
    return _memory_status_gb("VmHWM")


def current_rss_gb() -> float:
    """This process's resident memory now (VmRSS), in GB."""
    return _memory_status_gb("VmRSS")


def _memory_status_gb(field: str) -> float:
    """A memory field of /proc/self/status (Linux reports kB), in GB."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith(field))
    return kb * 1024 / 1e9


def _restart_scoped_store(rank: int, world_size: int) -> dict:
    """init_process_group arguments that keep each elastic restart's keys apart.

    torchrun (torch >= 2.5) shares its agent's rendezvous TCPStore with the workers, and
    init_process_group adds no per-attempt prefix to it: after a rank dies and torchrun
    restarts the workers, they can read the addresses the killed attempt left under the
    same keys and fail in "Gloo connectFullMesh ... Connection refused", or hang
    (pytorch/pytorch#135712). Measured here: both elastic-restart fault scenarios of
    bench/faults.py failed that way. Every agent restarts its workers together and counts
    the restarts alike (TORCHELASTIC_RESTART_COUNT), so the count names the attempt.
    Without the shared store (or outside torchrun) the default env:// rendezvous is kept."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent_store = torch_dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
    )
    store = torch_dist.PrefixStore(f"nextrec/attempt-{attempt}/", agent_store)
    return {"store": store, "rank": rank, "world_size": world_size}


def close_distributed(dist: Distributed) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


class TrainTask(nn.Module):
    """`forward(batch)` = the model's training forward, so DDP sees the training step as
    its forward (it prepares the gradient reduction there). Returns (loss, RetrievalOutput).
    Call backward on the returned loss, not on `RetrievalOutput.loss`: DDP hands back
    the loss routed through its own autograd node, and with a static graph a backward
    that bypasses it never reduces the gradients (measured: silently unsynced ranks)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch, telemetry: bool = True):
        output = self.model.train_forward(batch, telemetry)
        return output.loss, output


def sharding_plan(task: nn.Module, dist: Distributed, config: DistributedConfig):
    """TorchRec's planner, with each configured table constrained to its sharding type."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

    constraints = {table: ParameterConstraints(sharding_types=[kind]) for table, kind in config.sharding.items()}
    topology = Topology(world_size=dist.world_size, compute_device=dist.device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints, debug=False)
    return planner.collective_plan(task, pg=torch_dist.GroupMember.WORLD)


def _sum_allreduce_hook(state, bucket):
    """DDP comm hook: sum gradients over ranks instead of averaging them (see module doc)."""
    work = torch_dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def shard_model(model: nn.Module, dist: Distributed, config: DistributedConfig) -> nn.Module:
    """Wrap the model's training step for `dist`: a `TrainTask` when single-process,
    else DistributedModelParallel over it (ID tables sharded by the plan, with the fused
    optimizer the model's tables were given by `apply_optimizer_in_backward`; the dense
    towers replicated by DDP). The model object itself is sharded in place, so its own
    methods (encode_queries, candidate_vectors) keep working on every rank."""
    task = TrainTask(model)
    if not dist.enabled:
        return task
    from torchrec.distributed.comm_ops import set_gradient_division
    from torchrec.distributed.model_parallel import DistributedModelParallel

    # TorchRec divides the tables' gradients by the world size by default (to mirror DDP's
    # averaging); the losses here are already each rank's share, so gradients are summed.
    set_gradient_division(False)
    plan = sharding_plan(task, dist, config)
    if dist.is_main:
        log.info("sharding plan:\n%s", plan)
    # DMP's DDP does not broadcast buffers (broadcast_buffers=False), and must not: the
    # ones that change (training step, streaming frequency estimates) change identically on
    # every rank, the static ones (feature offsets) are as large as the vocabulary, and log q
    # differs by rank where each holds its own share of the targets' (models/samplers.py
    # RowShare). tests/trainer/test_distributed.py's 2-rank training test would catch a
    # broadcast (its ranks hold different rows of log q).
    sharded = DistributedModelParallel(task, device=dist.device, plan=plan)
    ddp = sharded._dmp_wrapped_module
    if isinstance(ddp, nn.parallel.DistributedDataParallel):
        ddp.register_comm_hook(state=None, hook=_sum_allreduce_hook)
    return sharded


def unsharded_state_dict(model: nn.Module, dist: Distributed) -> dict[str, torch.Tensor]:
    """The model's state as plain tensors, sharded tables gathered whole on rank 0, for
    comparing a sharded model with a single-process one (the serving export,
    trainer/export.py, never gathers a table). Collective: every rank must call it; only
    rank 0's result holds the tables."""
    state = model.state_dict()
    if not dist.enabled:
        return state
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    plain = {}
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            whole = torch.empty(value.size(), dtype=value.dtype) if dist.is_main else None
            value.gather(dst=0, out=whole)
            if dist.is_main:
                plain[key] = whole
        else:
            plain[key] = value
    return plain


@torch.no_grad()
def load_unsharded_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy plain tensors (an `unsharded_state_dict`, a single-process model's state) into
    a model whose tables may be sharded: each rank copies the slices its shards own."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise KeyError(f"state lacks {len(missing)} key(s) of the model, e.g. {missing[:3]}")
    for key, value in own.items():
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                meta = shard.metadata
                window = tuple(slice(o, o + n) for o, n in zip(meta.shard_offsets, meta.shard_sizes))
                shard.tensor.copy_(state[key][window])
        else:
            value.copy_(state[key])


@dataclass(frozen=True)
class QueryGather:
    """Every rank's queries gathered and put in the order one process holding them all has
    (by actor, stable): per-query values, jagged per-query lists and row indices of this
    rank's queries. Each method is collective: every rank calls it."""

    dist: Distributed
    order: np.ndarray
    """[Q] gathered index (rank order) of each query in actor order."""
    position: np.ndarray
    """[Q] inverse of `order`: where the query of each gathered index goes."""
    offset: int
    """The gathered index of this rank's first query."""

    @staticmethod
    def of(actor_Q: np.ndarray, dist: Distributed) -> QueryGather:
        """From the actor of each of this rank's queries."""
        all_actor_Q, sizes = dist.gather_varying_with_sizes(torch.from_numpy(np.ascontiguousarray(actor_Q, dtype=np.int64)))
        order = torch.argsort(all_actor_Q, stable=True).numpy()
        position = np.empty_like(order)
        position[order] = np.arange(len(order))
        return QueryGather(dist, order, position, int(sizes[: dist.rank].sum()))

    def __len__(self) -> int:
        return len(self.order)

    def values(self, local: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """A per-query array (or tensor, rows first) of this rank's queries, gathered."""
        if isinstance(local, torch.Tensor):
            return self.dist.gather_varying(local)[torch.from_numpy(self.order)]
        return self.dist.gather_varying(torch.from_numpy(np.ascontiguousarray(local))).numpy()[self.order]

    def rows(self, local_rows: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Where rows of this rank's queries go among the gathered ones, gathered (every
        rank's rows, in rank order: gather their companions with `dist.gather_varying`)."""
        if isinstance(local_rows, torch.Tensor):
            return torch.from_numpy(self.position)[self.dist.gather_varying(local_rows + self.offset)]
        return self.position[self.dist.gather_varying(torch.from_numpy(local_rows + self.offset)).numpy()]

    def jagged(self, lengths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-query lists of this rank's queries (`lengths`, flat `values`), gathered:
        (offsets [Q + 1], flat values)."""
        all_lengths = self.dist.gather_varying(torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int64))).numpy()
        all_values = self.dist.gather_varying(torch.from_numpy(np.ascontiguousarray(values))).numpy()
        starts = np.r_[0, np.cumsum(all_lengths)][:-1]
        lengths_out = all_lengths[self.order]
        offsets = np.r_[0, np.cumsum(lengths_out)].astype(np.int64)
        flat = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths_out) + np.repeat(starts[self.order], lengths_out)
        return offsets, all_values[flat]


def owned_candidates(model: nn.Module, stats: TargetStats, dist: Distributed, table: str = TARGET_TABLE) -> np.ndarray:
    """[C'] int64 the candidates (`stats.candidate_bits`) whose rows of `table` this rank
    holds (all of them in one process), ascending, so evaluation computes each candidate
    vector where its embedding lives. Every candidate is owned by exactly one rank
    (row-wise: a row range each; table-wise: the rank holding the table). Built from the
    mask for the rank's rows alone: no rank makes the IDs of every candidate."""
    if not dist.enabled:
        return stats.candidates
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    weight = model.embeddings.table_weights()[table]
    if not isinstance(weight, ShardedTensor):
        raise ValueError(f"owned_candidates: expected the {table!r} table to be sharded")
    pieces = [stats.candidates_in(start, start + rows) for start, rows in sorted(_local_row_ranges(weight))]
    return pieces[0] if len(pieces) == 1 else np.concatenate([np.zeros(0, dtype=np.int64), *pieces])


@dataclass(frozen=True)
class LocalRows:
    """The rows of an ID table this rank holds whole (every column), read without any
    collective call: `(first row, rows [n, D])` per shard (views of the live table)."""

    shards: list[tuple[int, torch.Tensor]]

    def of(self, ids: torch.Tensor) -> torch.Tensor:
        """[N] IDs, every one held here -> [N, D] rows, as a lookup of them returns them."""
        if len(self.shards) == 1:
            start, rows = self.shards[0]
            return rows[ids - start]
        out = torch.empty(len(ids), self.shards[0][1].shape[1], dtype=self.shards[0][1].dtype)
        for start, rows in self.shards:
            inside = (ids >= start) & (ids < start + rows.shape[0])
            out[inside] = rows[ids[inside] - start]
        return out


def local_table_rows(model: nn.Module, table: str = TARGET_TABLE) -> LocalRows | None:
    """This rank's rows of `table` (the whole table in one process), or None when the
    sharding splits a row's columns over ranks (column-wise): then only a collective
    lookup gives a whole row."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    weight = model.embeddings.table_weights()[table]
    if not isinstance(weight, ShardedTensor):
        return LocalRows([(0, weight)])
    dim = weight.size(1)
    shards = [
        (shard.metadata.shard_offsets[0], shard.tensor)
        for shard in weight.local_shards()
        if shard.metadata.shard_sizes[1] == dim
    ]
    if len(shards) != len(weight.local_shards()):
        return None
    return LocalRows(shards)


def _local_row_ranges(table) -> list[tuple[int, int]]:
    """(first row, number of rows) of each shard of a sharded table this rank holds.
    Column-wise pieces of a row count once: the rank holding column 0 owns the row."""
    return [
        (shard.metadata.shard_offsets[0], shard.metadata.shard_sizes[0])
        for shard in table.local_shards()
        if shard.metadata.shard_offsets[1] == 0
    ]


def rank_resources(
    model: nn.Module, dist: Distributed, events_held: int = 0, rss_after: dict[str, float] | None = None
) -> dict:
    """Per rank (lists in rank order): peak resident memory so far and the baseline (after
    imports and process-group set-up, before any data), in GB; the bytes of ID-table rows
    it holds and of their optimizer state; the events it holds in memory (`events_held`:
    its actors' own and, in a shared ID space, those that reached them); and how many rows
    of each ID table it holds, which shows that no rank holds a whole sharded table;
    `rss_after`: resident GB after each phase of the run (the same phases on every rank).
    Collective: every rank must call it."""
    phases = rss_after or {}
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    peak_gb = peak_rss_gb()
    baseline_gb = _BASELINE_RSS_GB[0] if _BASELINE_RSS_GB else float("nan")
    rows: dict[str, int] = {}
    table_bytes = 0
    for table, value in model.embeddings.table_weights().items():
        rows[table] = sum(count for _, count in _local_row_ranges(value)) if isinstance(value, ShardedTensor) \
            else value.shape[0]
        table_bytes += _local_bytes(value)
    optimizer_bytes = sum(
        _local_bytes(state)
        for parameter in model.embeddings.parameters()
        for optimizer in getattr(parameter, "_in_backward_optimizers", [])
        for per_parameter in optimizer.state.values()
        for state in per_parameter.values()
        if isinstance(state, torch.Tensor)
    )
    every = dist.gather(torch.tensor(
        [[peak_gb, baseline_gb, table_bytes / 1e9, optimizer_bytes / 1e9, events_held, *phases.values(),
          *rows.values()]],
        dtype=torch.float64,
    ))
    return {
        "peak_rss_gb_per_rank": [round(float(v), 3) for v in every[:, 0]],
        "baseline_rss_gb_per_rank": [round(float(v), 3) for v in every[:, 1]],
        "table_gb_per_rank": [round(float(v), 3) for v in every[:, 2]],
        "optimizer_gb_per_rank": [round(float(v), 3) for v in every[:, 3]],
        "events_held_per_rank": [int(v) for v in every[:, 4]],
        "rss_gb_after_per_rank": {name: [round(float(v), 3) for v in every[:, 5 + i]] for i, name in enumerate(phases)},
        "table_rows_per_rank": {
            name: [int(v) for v in every[:, 5 + len(phases) + i]] for i, name in enumerate(rows)
        },
    }


def _local_bytes(tensor: torch.Tensor) -> int:
    """Bytes of `tensor` this rank holds (its local shards of a sharded one)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(tensor, ShardedTensor):
        return sum(shard.tensor.numel() * shard.tensor.element_size() for shard in tensor.local_shards())
    return tensor.numel() * tensor.element_size()
