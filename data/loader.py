"""Rank-aware, resumable training loader.

Every epoch the training examples are shuffled with a generator seeded by
(seed, epoch), identically on every rank. Step k of the epoch takes the global
slice `perm[k*G : (k+1)*G]` (G = batch_size * world_size) and rank r keeps its
`batch_size` share of it, so ranks see disjoint examples and the same number of
steps; the last incomplete global batch of an epoch is dropped.

Randomness inside a batch (random negatives) comes from a generator seeded by
(seed, epoch, step, rank), so batches are identical whether they are built in
the training process or in DataLoader workers, and after a resume.

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
class BatchRequest:
    epoch: int
    step: int
    rows: np.ndarray  # example indices of this rank's share


class EpochBatchSampler(Sampler[BatchRequest]):
    """Yields this rank's `BatchRequest`s for one epoch, from `start_step` on."""

    def __init__(
        self, num_examples: int, batch_size: int, *, seed: int, epoch: int, rank: int, world_size: int, start_step: int = 0
    ) -> None:
        self.num_examples, self.batch_size = num_examples, batch_size
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.start_step = start_step

    @staticmethod
    def steps_per_epoch(num_examples: int, batch_size: int, world_size: int) -> int:
        return num_examples // (batch_size * world_size)

    def __len__(self) -> int:
        return self.steps_per_epoch(self.num_examples, self.batch_size, self.world_size) - self.start_step

    def __iter__(self) -> Iterator[BatchRequest]:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_examples)
        global_batch = self.batch_size * self.world_size
        for step in range(self.start_step, self.steps_per_epoch(self.num_examples, self.batch_size, self.world_size)):
            lo = step * global_batch + self.rank * self.batch_size
            yield BatchRequest(self.epoch, step, perm[lo : lo + self.batch_size])


class _RequestedBatches(Dataset):
    """Map-style dataset whose 'index' is a whole `BatchRequest`, so workers build full batches."""

    def __init__(self, builder: BatchBuilder, seed: int, rank: int) -> None:
        self.builder, self.seed, self.rank = builder, seed, rank

    def __getitem__(self, request: BatchRequest) -> Batch:
        rng = np.random.default_rng([self.seed, request.epoch, request.step, self.rank])
        return self.builder.build(request.rows, rng)

    def __len__(self) -> int:  # pragma: no cover - DataLoader with a sampler never asks
        return len(self.builder.queries)


def _identity(batch: Batch) -> Batch:
    return batch


class TrainLoader:
    """Endless iterator over training batches (epoch after epoch) with an exact position.

    Example::

        loader = TrainLoader(builder, batch_size=128, seed=0, rank=0, world_size=1)
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
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.builder, self.batch_size, self.seed = builder, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.epoch, self.step = 0, 0
        if self.steps_per_epoch == 0:
            # A user error (a tiny or degenerate log, or a batch too large for it), so a
            # DataError: the entry point prints it in one line.
            if len(builder.queries) == 0:
                raise DataError(
                    "no training examples: no actor has an event with loader.min_history earlier events "
                    "left after the validation and test events are held out; the log is too small"
                )
            raise DataError(
                f"{len(builder.queries)} training examples cannot fill one global batch of "
                f"{batch_size} x {world_size} ranks; lower loader.batch_size"
            )

    @property
    def steps_per_epoch(self) -> int:
        return EpochBatchSampler.steps_per_epoch(len(self.builder.queries), self.batch_size, self.world_size)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def _epoch_loader(self) -> DataLoader:
        sampler = EpochBatchSampler(
            len(self.builder.queries),
            self.batch_size,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            start_step=self.step,
        )
        return DataLoader(
            _RequestedBatches(self.builder, self.seed, self.rank),
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
