"""Rank-aware, resumable training loader over each rank's share of the examples.

Each rank holds its own share: the training examples of the actors of its partitions
(data/dataset.py). Every epoch a share's examples are shuffled by a generator seeded by
(seed, epoch, share) and cut into batches of `batch_size`; every share runs the same
number of steps, the least any share fills (`steps_per_epoch`), so the few examples past
that in the larger shares sit out the epoch: a different random few every epoch, so no
example is favoured across epochs. The global batch of step k is the concatenation of
every share's batch k in rank order.

One process may hold several shares (what N ranks would hold, to compare a run on N
ranks with one process on the same global batches): its batch of step k is then the
concatenation of its shares' batches k. One share of every example, the single-process
default, is share 0.

Randomness inside a batch (random negatives) comes from a generator seeded by
(seed, epoch, step, share), so batches are identical whether they are built in the
training process or in DataLoader workers, and after a resume.

The position (epoch, examples of each share consumed in it) is counted where batches
are *consumed*, not where workers prefetch them, so `state_dict()` is exact. It is kept
in examples, not steps, so a run resumed with another batch size goes on at the next
unseen example of each share. Resumed on another number of shares (ranks) mid-epoch,
the shares hold other examples in another order, so which ones were seen is not known
per example: the new shares go on from the same fraction of the epoch (a warning says
so); every example is still drawn once per epoch in expectation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.batches import Batch, BatchBuilder
from data.readers import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Share:
    """The training examples of one rank: `rows` index the builder's queries."""

    id: int
    rows: np.ndarray


@dataclass(frozen=True)
class BatchRequest:
    epoch: int
    step: int
    rows: np.ndarray  # example indices, share after share
    shares: tuple[tuple[int, int], ...]  # (share id, rows of it) in `rows` order


def _share_generator(seed: int, epoch: int, share: int) -> np.random.Generator:
    # Share 0 keeps the stream the single-process loader always used, so a one-process
    # run draws the examples it drew before shares existed (the logged runs stand).
    return np.random.default_rng([seed, epoch] if share == 0 else [seed, epoch, share])


def _shuffled(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`rows[rng.permutation(len(rows))]`, the same order from the same draws (permutation
    is a shuffle of an arange; the same swaps applied to `rows` give `rows` permuted
    alike), without the [n] int64 permutation beside it, and in int32 where the indices
    fit: a rank holds its epoch's order for the whole epoch. On rank 0 of 4 of
    bench/scale.py: 9 MB held instead of 18, and 9 MB at the peak instead of 36."""
    fits = len(rows) == 0 or int(rows.max()) <= np.iinfo(np.int32).max
    order = rows.astype(np.int32 if fits else rows.dtype)  # a copy
    rng.shuffle(order)
    return order


class EpochBatchSampler(Sampler[BatchRequest]):
    """Yields this process's `BatchRequest`s for one epoch: batches of `batch_size`
    examples of each share, from its `start_example`-th example of the epoch on, as many
    as fit in `epoch_examples` (what the smallest share of any rank holds)."""

    def __init__(
        self, shares: list[Share], batch_size: int, epoch_examples: int, *, seed: int, epoch: int,
        start_example: int = 0,
    ) -> None:
        self.shares, self.batch_size, self.epoch_examples = shares, batch_size, epoch_examples
        self.seed, self.epoch, self.start_example = seed, epoch, start_example

    def __len__(self) -> int:
        return (self.epoch_examples - self.start_example) // self.batch_size

    def __iter__(self) -> Iterator[BatchRequest]:
        orders = [_shuffled(share.rows, _share_generator(self.seed, self.epoch, share.id)) for share in self.shares]
        for i in range(len(self)):
            lo = self.start_example + i * self.batch_size
            # The random negatives' generator is keyed by the step, which for a run that
            # never changed its batch size is the step of the epoch.
            step = lo // self.batch_size
            yield BatchRequest(
                self.epoch, step, np.concatenate([order[lo : lo + self.batch_size] for order in orders]),
                tuple((share.id, self.batch_size) for share in self.shares),
            )


class _RequestedBatches(Dataset):
    """Map-style dataset whose 'index' is a whole `BatchRequest`, so workers build full batches."""

    def __init__(self, builder: BatchBuilder, seed: int) -> None:
        self.builder, self.seed = builder, seed

    def __getitem__(self, request: BatchRequest) -> Batch:
        negatives = [
            self.builder.random_negatives(np.random.default_rng([self.seed, request.epoch, request.step, share]), rows)
            for share, rows in request.shares
        ]
        return self.builder.build(request.rows, negatives=np.concatenate(negatives))

    def __len__(self) -> int:  # pragma: no cover - DataLoader with a sampler never asks
        return len(self.builder.queries)


def _identity(batch: Batch) -> Batch:
    return batch


class TrainLoader:
    """Endless iterator over training batches (epoch after epoch) with an exact position.

    Example::

        loader = TrainLoader(builder, batch_size=128, seed=0)        # one share: every example
        loader = TrainLoader(builder, batch_size=128, seed=0, shares=[Share(rank, rows)],
                             epoch_examples=least_over_ranks, num_shares=world_size)  # one rank's share
        for batch in loader: ...            # runs until the caller stops
        state = loader.state_dict()         # epoch, examples of each share consumed in it, layout
        loader.load_state_dict(state)       # the next batch starts at the next unseen example
    """

    def __init__(
        self,
        builder: BatchBuilder,
        *,
        batch_size: int,
        seed: int,
        shares: list[Share] | None = None,
        epoch_examples: int | None = None,
        num_shares: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        """`shares`: the shares this process builds batches of (default: one of every
        example). `epoch_examples`: the examples the smallest share of any rank holds
        (every rank must run as many steps); default: the least over `shares`.
        `num_shares`: the shares over all ranks (default: this process's)."""
        self.builder, self.batch_size, self.seed = builder, batch_size, seed
        self.shares = shares if shares is not None else [Share(0, np.arange(len(builder.queries)))]
        fewest = min(len(share.rows) for share in self.shares)
        self.epoch_examples = fewest if epoch_examples is None else min(epoch_examples, fewest)
        self.num_shares = len(self.shares) if num_shares is None else num_shares
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.epoch, self.examples = 0, 0
        if self.steps_per_epoch == 0:
            # A user error (a tiny or degenerate log, or a batch too large for it), so a
            # DataError: the entry point prints it in one line.
            raise DataError(
                f"{min(len(s.rows) for s in self.shares)} training examples cannot fill one batch of "
                f"loader.batch_size={batch_size}; lower loader.batch_size"
            )

    @property
    def batch_rows(self) -> int:
        """Rows of each batch this process builds (batch_size per share it holds)."""
        return self.batch_size * len(self.shares)

    @property
    def steps_per_epoch(self) -> int:
        return self.epoch_examples // self.batch_size

    def state_dict(self) -> dict[str, int]:
        """The epoch, the examples of each share consumed in it, and the layout they were
        counted in (shares over all ranks, the examples an epoch draws of each)."""
        return {"epoch": self.epoch, "examples": self.examples, "num_shares": self.num_shares,
                "epoch_examples": self.epoch_examples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, examples = int(state["epoch"]), int(state["examples"])
        same_layout = (int(state["num_shares"]), int(state["epoch_examples"])) == (self.num_shares, self.epoch_examples)
        if examples and not same_layout:
            # Other shares: the same fraction of the epoch, in this layout's examples.
            fraction = examples / max(int(state["epoch_examples"]), 1)
            moved = min(round(fraction * self.epoch_examples), self.epoch_examples)
            log.warning(
                "resumed %.1f%% into epoch %d on %d shares of %d examples (written on %d of %d): which examples "
                "were drawn is not known per example in another layout, so each share goes on from the same "
                "fraction of its epoch", 100 * fraction, self.epoch, self.num_shares, self.epoch_examples,
                int(state["num_shares"]), int(state["epoch_examples"]),
            )
            examples = moved
        self.examples = examples
        if self.examples + self.batch_size > self.epoch_examples:  # no full batch left in this epoch
            self.epoch, self.examples = self.epoch + 1, 0

    def _epoch_loader(self) -> DataLoader:
        sampler = EpochBatchSampler(
            self.shares, self.batch_size, self.epoch_examples, seed=self.seed, epoch=self.epoch,
            start_example=self.examples,
        )
        return DataLoader(
            _RequestedBatches(self.builder, self.seed),
            sampler=sampler,
            batch_size=None,
            collate_fn=_identity,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=False,
            # Its own generator: a DataLoader iterator draws a seed from the generator it
            # is given, and from the global one it would shift every later dropout mask,
            # so a resumed run (a new iterator mid-epoch) would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def __iter__(self) -> Iterator[Batch]:
        while True:
            for batch in self._epoch_loader():
                self.examples += self.batch_size
                yield batch
            self.epoch, self.examples = self.epoch + 1, 0
