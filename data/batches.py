"""Queries -> `Batch`: KeyedJaggedTensors the embedding tables (and later their sharded
versions) take directly, plus the dense tensors the losses need.

Example of the jagged history layout for a batch of three queries with a history window
(`BatchSpec.history_window`) of 3:

    query             0          1        2        <-- batch index
    history_target    [7, 3, 9]  []       [4]
    history_action    [0, 1, 0]  []       [2]
    history_timestamp [t, t, t]  []       [t]
    lengths           3          0        1

Histories are the actor's last `history_window` events before the predicted one, oldest
first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from configs.names import HISTORY_KEYS, INCOMING_KEYS, QUERY_KEYS
from data.incoming import Incoming
from data.sequences import Queries, Sequences



@dataclass
class Batch(Pipelineable):
    """One batch of next-target examples.

    history: KJT keys `HISTORY_KEYS`, each with lengths [B] (same lengths for all three).
    query: KJT keys `QUERY_KEYS`, one value per example each: who acts, the action it is
        about to take and when (known at request time).
    target: [B] int64, the positive target index (-1 for inference requests).
    random_negatives: [B, R] int64 random target indices from the active pool (R may be 0).
    incoming: KJT keys `INCOMING_KEYS` (same lengths for both): the last events that reached
        the actor before the query's time, oldest first (see data/incoming.py); None when
        the log has no shared ID space or the model does not read them.
    contact_activity: [U, ACTIVITY_FEATURES] float32, each contact pair's contact's own
        recent activity (data/activity.py), in the re-scorer's pair order
        (models/repeat.py `contact_keys`). Looked up across ranks at step time, after the
        batch is built (models/retrieval.py `TwoTowerRetrieval.with_contact_activity`, with
        trainer/build.py `contact_activity`); None when not read.
    """

    history: KeyedJaggedTensor
    query: KeyedJaggedTensor
    target: torch.Tensor
    random_negatives: torch.Tensor
    incoming: KeyedJaggedTensor | None = None
    contact_activity: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.target.shape[0]

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            history=self.history.to(device=device, non_blocking=non_blocking),
            query=self.query.to(device=device, non_blocking=non_blocking),
            target=self.target.to(device=device, non_blocking=non_blocking),
            random_negatives=self.random_negatives.to(device=device, non_blocking=non_blocking),
            incoming=None if self.incoming is None else self.incoming.to(device=device, non_blocking=non_blocking),
            contact_activity=(
                None if self.contact_activity is None
                else self.contact_activity.to(device=device, non_blocking=non_blocking)
            ),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.history.record_stream(stream)
        self.query.record_stream(stream)
        self.target.record_stream(stream)
        self.random_negatives.record_stream(stream)
        if self.incoming is not None:
            self.incoming.record_stream(stream)
        if self.contact_activity is not None:
            self.contact_activity.record_stream(stream)

    def pin_memory(self) -> Batch:
        return Batch(
            history=self.history.pin_memory(),
            query=self.query.pin_memory(),
            target=self.target.pin_memory(),
            random_negatives=self.random_negatives.pin_memory(),
            incoming=None if self.incoming is None else self.incoming.pin_memory(),
            contact_activity=None if self.contact_activity is None else self.contact_activity.pin_memory(),
        )

    def query_values(self, key: str) -> torch.Tensor:
        """[B] the single value of a query key per example."""
        return self.query[key].values()


@dataclass(frozen=True)
class BatchSpec:
    """What each example of a batch carries, resolved once from the config and the log
    (trainer/build.py `batch_spec`); the training loader and the evaluation scorer build
    their batches from the same spec.

        history_window    events of the actor's history, oldest first (the encoder reads
                          the last data.max_len of them, the re-scorer all)
        num_rand_negs     random negatives (training only; 0 when scoring)
        incoming_window   the latest events that reached the actor before the query's
                          time, for the re-scorer; 0: none (re-scorer off, the option at
                          0, or actors and targets are separate IDs)
    """

    history_window: int
    num_rand_negs: int = 0
    incoming_window: int = 0

    def __post_init__(self) -> None:
        if self.history_window < 1 or self.num_rand_negs < 0 or self.incoming_window < 0:
            raise ValueError(f"BatchSpec: expected history_window >= 1 and the rest >= 0, got {self}")


@dataclass(frozen=True)
class BatchBuilder:
    """Builds `Batch`es for rows of a `Queries` table, vectorised in numpy, as `spec` says."""

    seqs: Sequences
    queries: Queries
    spec: BatchSpec
    active_pool: np.ndarray  # [P] target indices random negatives are drawn from
    incoming: Incoming | None = None
    """Known incoming events (shared ID space): given exactly when the spec carries them."""

    def __post_init__(self) -> None:
        if (self.incoming is not None) != (self.spec.incoming_window > 0):
            raise ValueError(
                f"BatchBuilder: incoming events {'given' if self.incoming is not None else 'missing'} for a spec with "
                f"incoming_window {self.spec.incoming_window}"
            )

    def random_negatives(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        """[rows, num_rand_negs] target indices drawn uniformly from the active pool."""
        if not self.spec.num_rand_negs:  # no draw (the pool may then be left empty)
            return np.zeros((rows, 0), dtype=np.int64)
        return self.active_pool[rng.integers(0, len(self.active_pool), size=(rows, self.spec.num_rand_negs))]

    def build(
        self, rows: np.ndarray, rng: np.random.Generator | None = None, *, negatives: np.ndarray | None = None
    ) -> Batch:
        """The batch of examples `rows`; random negatives drawn from `rng`, or given
        (`negatives`, [B, num_rand_negs]), or none."""
        rows = np.asarray(rows, dtype=np.int64)
        position = self.queries.position[rows]
        start = np.maximum(self.queries.history_start[rows], position - self.spec.history_window)
        lengths = position - start
        flat = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths) + np.repeat(start, lengths)

        history_lengths = torch.from_numpy(np.tile(lengths, len(HISTORY_KEYS)))
        history = KeyedJaggedTensor.from_lengths_sync(
            keys=list(HISTORY_KEYS),
            values=torch.from_numpy(
                np.concatenate(
                    [self.seqs.targets[flat], self.seqs.actions[flat].astype(np.int64), self.seqs.timestamps[flat]]
                )
            ),
            lengths=history_lengths,
        )
        batch = len(rows)
        if self.queries.next_action is not None:
            # A request for an event not in the log: what is known about it comes with it.
            next_action, next_timestamp = self.queries.next_action[rows], self.queries.next_timestamp[rows]
            target = np.full(batch, -1, dtype=np.int64)
        else:
            next_action, next_timestamp = self.seqs.actions[position].astype(np.int64), self.seqs.timestamps[position]
            target = self.seqs.targets[position]
        query = KeyedJaggedTensor.from_lengths_sync(
            keys=list(QUERY_KEYS),
            values=torch.from_numpy(
                np.concatenate([self.seqs.actor[self.queries.sequence[rows]], next_action, next_timestamp])
            ),
            lengths=torch.ones(batch * len(QUERY_KEYS), dtype=torch.int64),
        )
        if negatives is None and self.spec.num_rand_negs and rng is not None:
            negatives = self.random_negatives(rng, batch)
        if negatives is None or not self.spec.num_rand_negs:
            negatives = np.zeros((batch, 0), dtype=np.int64)
        return Batch(
            history=history,
            query=query,
            target=torch.from_numpy(np.array(target, dtype=np.int64)),
            random_negatives=torch.from_numpy(np.ascontiguousarray(negatives, dtype=np.int64)),
            incoming=self._incoming(self.seqs.actor[self.queries.sequence[rows]], next_timestamp),
        )

    def _incoming(self, actors: np.ndarray, before: np.ndarray) -> KeyedJaggedTensor | None:
        if self.incoming is None:
            return None
        flat, lengths = self.incoming.window(actors, before, self.spec.incoming_window)
        return KeyedJaggedTensor.from_lengths_sync(
            keys=list(INCOMING_KEYS),
            values=torch.from_numpy(np.concatenate([self.incoming.sources[flat], self.incoming.timestamps[flat]])),
            lengths=torch.from_numpy(np.tile(lengths, len(INCOMING_KEYS))),
        )
