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

The position (epoch, steps done in it) is counted where batches are *consumed*,
not where workers prefetch them, so `state_dict()` is exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.batches import Batch, BatchBuilder
from data.readers import DataError


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


class EpochBatchSampler(Sampler[BatchRequest]):
    """Yields this process's `BatchRequest`s for one epoch, from `start_step` on."""

    def __init__(
        self, shares: list[Share], batch_size: int, steps_per_epoch: int, *, seed: int, epoch: int, start_step: int = 0
    ) -> None:
        self.shares, self.batch_size, self.steps = shares, batch_size, steps_per_epoch
        self.seed, self.epoch, self.start_step = seed, epoch, start_step

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self) -> Iterator[BatchRequest]:
        orders = [share.rows[_share_generator(self.seed, self.epoch, share.id).permutation(len(share.rows))]
                  for share in self.shares]
        for step in range(self.start_step, self.steps):
            lo, hi = step * self.batch_size, (step + 1) * self.batch_size
            yield BatchRequest(
                self.epoch, step, np.concatenate([order[lo:hi] for order in orders]),
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
                             steps_per_epoch=least_over_ranks)       # one rank's share
        for batch in loader: ...            # runs until the caller stops
        state = loader.state_dict()         # {"epoch": e, "step": s}: batches consumed
        loader.load_state_dict(state)       # the next batch is the one after `state`
    """

    def __init__(
        self,
        builder: BatchBuilder,
        *,
        batch_size: int,
        seed: int,
        shares: list[Share] | None = None,
        steps_per_epoch: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        """`shares`: the shares this process builds batches of (default: one of every
        example). `steps_per_epoch`: the least number of full batches any rank's share
        fills (every rank must run as many steps); default: the least over `shares`."""
        self.builder, self.batch_size, self.seed = builder, batch_size, seed
        self.shares = shares if shares is not None else [Share(0, np.arange(len(builder.queries)))]
        fewest = min(len(share.rows) for share in self.shares) // batch_size
        self.steps_per_epoch = fewest if steps_per_epoch is None else min(steps_per_epoch, fewest)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.epoch, self.step = 0, 0
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

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def _epoch_loader(self) -> DataLoader:
        sampler = EpochBatchSampler(
            self.shares, self.batch_size, self.steps_per_epoch, seed=self.seed, epoch=self.epoch, start_step=self.step
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
                self.step += 1
                yield batch
            self.epoch, self.step = self.epoch + 1, 0
