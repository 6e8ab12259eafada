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
unseen example of each share, in the same order.

Resumed on another number of shares (ranks) mid-epoch, the new shares hold other
examples, so the position alone cannot say which were drawn. What can: `drawn()`, the
examples drawn so far this epoch as bits per *partition* (the unit a share is made of,
data/dataset.py), over the partition's examples in row order -- the same bits whatever
the layout that wrote them. `load_state_dict(state, drawn)` then draws exactly the
examples not drawn yet, shuffled afresh (a *remainder* epoch), as many steps as the
share with the fewest left fills (the rest sit out, as the larger shares' few do in any
epoch); the next epoch starts whole. A resume into a remainder epoch takes the same path.
Without the bits (a checkpoint written before they were), the shares go on from the same
fraction of the epoch, and a warning says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.batches import Batch, BatchBuilder
from data.readers import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Share:
    """The training examples of one rank: `rows` index the builder's queries, ascending."""

    id: int
    rows: np.ndarray


@dataclass(frozen=True)
class BatchRequest:
    epoch: int
    step: int
    rows: np.ndarray  # example indices, share after share
    shares: tuple[tuple[int, int], ...]  # (share id, rows of it) in `rows` order
    streams: tuple[tuple[int, ...], ...] = ()  # per share, its remainder's key (random negatives); () whole epochs


def _share_generator(seed: int, epoch: int, share: int) -> np.random.Generator:
    # Share 0 keeps the stream the single-process loader always used, so a one-process
    # run draws the examples it drew before shares existed (the logged runs stand).
    return np.random.default_rng([seed, epoch] if share == 0 else [seed, epoch, share])


_REMAINDER_TAG = 2**31
"""Marks a remainder epoch's generator keys (never a share id or a step): its order is keyed
(seed, epoch, share, tag, examples of the share drawn before it) and its random negatives
(seed, epoch, step, share, tag, the same count), so neither repeats a whole epoch's
streams, nor an earlier remainder's of the same epoch."""


def _remainder_key(drawn_before: int) -> tuple[int, ...]:
    """What a remainder's generator keys add after the share (see _REMAINDER_TAG)."""
    return (_REMAINDER_TAG, drawn_before)


_LOOKUP_CHUNK = 1 << 20
"""Rows looked up at a time when marking drawn examples: bounded temporaries."""

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
    examples of each share's `orders`, from its `start_example`-th example of the epoch
    on, as many as fit in `epoch_examples` (what every rank's share fills: the smallest
    share of any rank, or in a remainder epoch the fewest examples any rank has left).
    `streams`: per share, its remainder's key (() in a whole epoch)."""

    def __init__(
        self, share_ids: list[int], orders: list[np.ndarray], batch_size: int, epoch_examples: int, *, epoch: int,
        start_example: int = 0, streams: tuple[tuple[int, ...], ...] = (),
    ) -> None:
        self.share_ids, self.orders, self.batch_size, self.epoch_examples = share_ids, orders, batch_size, epoch_examples
        self.epoch, self.start_example, self.streams = epoch, start_example, streams

    def __len__(self) -> int:
        return (self.epoch_examples - self.start_example) // self.batch_size

    def __iter__(self) -> Iterator[BatchRequest]:
        orders = self.orders
        for i in range(len(self)):
            lo = self.start_example + i * self.batch_size
            # The random negatives' generator is keyed by the step, which for a run that
            # never changed its batch size is the step of the epoch.
            step = lo // self.batch_size
            yield BatchRequest(
                self.epoch, step, np.concatenate([order[lo : lo + self.batch_size] for order in orders]),
                tuple((share, self.batch_size) for share in self.share_ids), self.streams,
            )


class _RequestedBatches(Dataset):
    """Map-style dataset whose 'index' is a whole `BatchRequest`, so workers build full batches."""

    def __init__(self, builder: BatchBuilder, seed: int) -> None:
        self.builder, self.seed = builder, seed

    def __getitem__(self, request: BatchRequest) -> Batch:
        streams = request.streams or ((),) * len(request.shares)
        negatives = [
            self.builder.random_negatives(
                np.random.default_rng([self.seed, request.epoch, request.step, share, *stream]), rows
            )
            for (share, rows), stream in zip(request.shares, streams)
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
                             epoch_examples=least_over_ranks, num_shares=world_size,
                             partition_of_rows=..., least_over_ranks=...)  # one rank's share
        for batch in loader: ...            # runs until the caller stops
        state = loader.state_dict()         # epoch, examples of each share consumed in it, layout
        drawn = loader.drawn()              # {partition: bits}, the examples drawn this epoch
        loader.load_state_dict(state, drawn)  # the next batch starts at the next unseen example
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
        partition_of_rows: Callable[[np.ndarray], np.ndarray] | None = None,
        least_over_ranks: Callable[[int], int] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        """`shares`: the shares this process builds batches of (default: one of every
        example). `epoch_examples`: the examples the smallest share of any rank holds
        (every rank must run as many steps); default: the least over `shares`.
        `num_shares`: the shares over all ranks (default: this process's).
        `partition_of_rows`: the partition of each row; a partition lies in one share
        (default: each share is one, numbered by its id). `least_over_ranks`: the least of a number over every
        rank, a collective (default: this process holds every share)."""
        self.builder, self.batch_size, self.seed = builder, batch_size, seed
        self.shares = shares if shares is not None else [Share(0, np.arange(len(builder.queries)))]
        for share in self.shares:
            if len(share.rows) > 1 and not bool(np.all(share.rows[1:] > share.rows[:-1])):
                raise ValueError(f"share {share.id}: rows must be ascending and distinct")
        fewest = min(len(share.rows) for share in self.shares)
        self.epoch_examples = fewest if epoch_examples is None else min(epoch_examples, fewest)
        self.num_shares = len(self.shares) if num_shares is None else num_shares
        self.partition_of_rows = partition_of_rows
        self.least_over_ranks = least_over_ranks or (lambda n: n)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.epoch, self.examples = 0, 0
        self._orders: tuple[int, list[np.ndarray]] | None = None  # (epoch, each share's order), once drawn
        # A remainder epoch (after a resume into another layout): each share's key, and
        # the examples each share draws in it. () in a whole epoch.
        self._streams: tuple[tuple[int, ...], ...] = ()
        self._remainder_examples = 0
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
        """Steps of a whole epoch."""
        return self.epoch_examples // self.batch_size

    @property
    def in_remainder(self) -> bool:
        return bool(self._streams)

    @property
    def _this_epoch_examples(self) -> int:
        """The examples of each share this epoch draws: a whole epoch's, or the remainder's."""
        return self._remainder_examples if self.in_remainder else self.epoch_examples

    def _epoch_done(self) -> bool:
        """No full batch left in this epoch (the next one starts when a batch is asked for)."""
        return self.examples + self.batch_size > self._this_epoch_examples

    def state_dict(self) -> dict[str, int]:
        """The epoch, the examples of each share consumed in it, the layout they were
        counted in (shares over all ranks, the examples a whole epoch draws of each), and
        whether the epoch is a remainder (its examples count from the resume). At an
        epoch's end: the next epoch, from its start."""
        if self._epoch_done():
            epoch, examples, remainder = self.epoch + 1, 0, 0
        else:
            epoch, examples, remainder = self.epoch, self.examples, int(self.in_remainder)
        return {"epoch": epoch, "examples": examples, "num_shares": self.num_shares,
                "epoch_examples": self.epoch_examples, "remainder": remainder}

    def _partition_groups(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(share index, partition, positions of its examples in the share, ascending) for
        each partition of this process's shares. One pass over a share per partition (a
        rank holds P / ranks of them; one process all P, 64 by default): time, not memory
        -- no [n] int64 argsort held beside a share at every checkpoint."""
        seen: set[int] = set()
        for i, share in enumerate(self.shares):
            if self.partition_of_rows is None:  # each share is one partition
                partitions = np.full(len(share.rows), share.id, dtype=np.int32)
            else:
                partitions = self.partition_of_rows(share.rows)
            for part in np.unique(partitions).tolist():
                if part in seen:
                    raise ValueError(f"partition {part} lies in two of this process's shares")
                seen.add(part)
                yield i, part, np.flatnonzero(partitions == part)

    def partition_sizes(self) -> dict[int, int]:
        """The examples of each partition of this process's shares."""
        return {part: len(positions) for _, part, positions in self._partition_groups()}

    def drawn(self) -> dict[int, np.ndarray]:
        """The examples drawn so far this epoch, for each partition of this process's
        shares: bits (np.packbits order) over the partition's examples in row order, 1 for
        drawn. Whatever layout writes them, a partition's bits are the same. (At an
        epoch's end, none: `state_dict` names the next epoch.)"""
        done = self._epoch_done()
        orders = self._epoch_orders() if not done and (self.examples or self.in_remainder) else None
        drawn_of_share = []
        for i, share in enumerate(self.shares):
            # A whole epoch marks what its order has drawn; a remainder, what it has not yet.
            drawn = np.full(len(share.rows), self.in_remainder and not done, dtype=bool)
            if orders is not None:
                marked = orders[i][self.examples :] if self.in_remainder else orders[i][: self.examples]
                for lo in range(0, len(marked), _LOOKUP_CHUNK):
                    drawn[np.searchsorted(share.rows, marked[lo : lo + _LOOKUP_CHUNK])] = not self.in_remainder
            drawn_of_share.append(drawn)
        return {part: np.packbits(drawn_of_share[i][positions]) for i, part, positions in self._partition_groups()}

    def load_state_dict(self, state: dict[str, int], drawn: dict[int, np.ndarray] | None = None) -> None:
        """Go on from `state` (`state_dict()` of this or another layout). `drawn` (`drawn()`
        of every rank that wrote `state`; at least this process's partitions) is needed
        to go on exactly in another layout or in a remainder epoch; see `needs_drawn`.
        With several ranks, every rank calls this (`least_over_ranks` is collective)."""
        self.epoch, examples = int(state["epoch"]), int(state["examples"])
        self._orders, self._streams = None, ()
        if self.needs_drawn(state):
            if drawn is not None:
                self._begin_remainder(drawn)
                return
            if int(state.get("remainder", 0)):
                raise ValueError("a remainder epoch's position without the examples it has drawn")
            # Written before the bits were: the same fraction of the epoch, in this layout's examples.
            fraction = examples / max(int(state["epoch_examples"]), 1)
            moved = min(round(fraction * self.epoch_examples), self.epoch_examples)
            log.warning(
                "resumed %.1f%% into epoch %d on %d shares of %d examples (written on %d of %d): the checkpoint "
                "does not say which examples were drawn, so each share goes on from the same fraction of its "
                "epoch", 100 * fraction, self.epoch, self.num_shares, self.epoch_examples,
                int(state["num_shares"]), int(state["epoch_examples"]),
            )
            examples = moved
        self.examples = examples
        if self._epoch_done():  # no full batch left in this epoch
            self.epoch, self.examples = self.epoch + 1, 0

    def needs_drawn(self, state: dict[str, int]) -> bool:
        """Whether going on from `state` exactly needs the drawn examples' bits: mid-epoch
        in another layout, or in a remainder epoch. (Another batch size alone does not:
        the same order goes on.)"""
        if int(state.get("remainder", 0)):
            return True
        same_layout = (int(state["num_shares"]), int(state["epoch_examples"])) == (self.num_shares, self.epoch_examples)
        return int(state["examples"]) > 0 and not same_layout

    def _begin_remainder(self, drawn: dict[int, np.ndarray]) -> None:
        """A remainder epoch over the examples `drawn` leaves: each share's undrawn rows,
        shuffled by a stream of its own, as many of each as the fewest any rank has left.
        Bits that do not fit this data are refused on every rank (a rank that raised
        alone would leave the others waiting in the collective)."""
        flags_of_share, refusal = [np.zeros(len(share.rows), dtype=bool) for share in self.shares], None
        for i, part, positions in self._partition_groups():
            bits = drawn.get(part)
            if bits is None:
                refusal = refusal or f"the checkpoint's drawn examples lack partition {part}"
            elif len(bits) != (len(positions) + 7) // 8:
                refusal = refusal or (
                    f"the checkpoint's drawn examples of partition {part} cover {8 * len(bits)} bits, but it "
                    f"holds {len(positions)} examples here: written for other data or another loader config"
                )
            else:
                flags_of_share[i][positions] = np.unpackbits(np.asarray(bits, dtype=np.uint8), count=len(positions))
        left = -1 if refusal else min(len(flags) - int(flags.sum()) for flags in flags_of_share)
        left = self.least_over_ranks(left)
        if refusal or left < 0:
            raise ValueError(refusal or "another rank refused the checkpoint's drawn examples")
        self.examples = 0
        if left < self.batch_size:  # not one full batch left on some rank: the next epoch
            self.epoch += 1
            return
        orders, streams = [], []
        for share, flags in zip(self.shares, flags_of_share):
            key = _remainder_key(int(flags.sum()))
            orders.append(_shuffled(share.rows[~flags], np.random.default_rng([self.seed, self.epoch, share.id, *key])))
            streams.append(key)
        self._orders, self._streams, self._remainder_examples = (self.epoch, orders), tuple(streams), left
        log.info("resumed into epoch %d's remainder: %d examples of each share left to draw", self.epoch, left)

    def _epoch_orders(self) -> list[np.ndarray]:
        """This epoch's order of each share (computed once an epoch; a remainder's when it begins)."""
        if self._orders is None or self._orders[0] != self.epoch:
            orders = [_shuffled(share.rows, _share_generator(self.seed, self.epoch, share.id)) for share in self.shares]
            self._orders = (self.epoch, orders)
        return self._orders[1]

    def _epoch_loader(self) -> DataLoader:
        sampler = EpochBatchSampler(
            [share.id for share in self.shares], self._epoch_orders(), self.batch_size, self._this_epoch_examples,
            epoch=self.epoch, start_example=self.examples, streams=self._streams,
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
            self._orders, self._streams = None, ()
