"""The simple baselines every quality table carries (../shared/BENCHMARK.md).

- `MostPopularScorer`: targets ranked by training-event count.
- `RecencyFrequencyScorer`: the actor's own past targets ranked by a count decayed
  with recency (weight 0.5 ** (newer events / half-life)); ties, and every target
  the actor has not interacted with, ordered by popularity.
- `TwoWayRecencyFrequencyScorer`: the same score over the merged stream of the actor's
  own past events and the released events that reached it (x -> actor, counted for x)
  strictly before the query's time, in (timestamp, row) order. Only where actors and
  targets are one ID space (messaging, e-mail, trust).

All are `RankingScorer`s for `trainer/evaluation.py`. Scores are exact integers in
float64 (lexicographic keys encoded as `primary * (P + 1) + popularity_rank`), so ties
are ties and nothing depends on float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import polars as pl
import torch

HALF_LIVES = (1.0, 5.0, 20.0, float("inf"))
"""The half-lives (in events) the protocol chooses among by validation NDCG@10."""


class Ranks(Protocol):
    """The collectives a baseline needs when each rank holds the counts of some targets
    (trainer/distributed.py `Distributed` is one)."""

    def max(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def gather_varying(self, tensor: torch.Tensor) -> torch.Tensor: ...


def popularity_rank(counts: np.ndarray, ranks: Ranks | None = None) -> np.ndarray:
    """Dense rank of counts (>= 0): 0 for the least counted, equal counts share a rank.
    [T] int32 (int64 past 2^31 targets). With `ranks`, `counts` are this rank's targets'
    and the ranks are over every rank's counts (collective)."""
    return popularity_levels(counts, ranks)[0]


def popularity_levels(counts: np.ndarray, ranks: Ranks | None = None) -> tuple[np.ndarray, int]:
    """(`popularity_rank`, the number of distinct counts over every rank).

    Computed without sorting the targets: a table over the count values, which are at
    most a log's event count and in practice far fewer than the targets, marks the values
    present and numbers them in order (np.unique's sort of [T] held 4 more [T] int64
    arrays, 0.33 GB at 1e7 targets); on several ranks the tables are merged (a maximum).
    Counts spread wider than 4 T take the sort, and on several ranks a gather of each
    rank's distinct values."""
    if counts.dtype == bool or not np.issubdtype(counts.dtype, np.integer):
        raise TypeError(f"popularity_rank: expected integer counts, got {counts.dtype}")
    dtype = np.int32 if len(counts) < 2**31 else np.int64
    highest, negated_lowest = int(counts.max(initial=0)), -int(counts.min(initial=0))
    spread = 4 * len(counts) + 1024
    if ranks is not None:  # agreed before any rank may raise: the others would wait for it
        agreed = ranks.max(torch.tensor([highest, spread, negated_lowest], dtype=torch.int64))
        highest, spread, negated_lowest = (int(v) for v in agreed)
    if negated_lowest > 0:
        raise ValueError(f"popularity_rank: counts must be >= 0, got {-negated_lowest}")
    if highest > spread:
        distinct = np.unique(counts)
        if ranks is not None:
            distinct = np.unique(ranks.gather_varying(torch.from_numpy(distinct.astype(np.int64))).numpy())
        return np.searchsorted(distinct, counts).astype(dtype), len(distinct)
    present = np.zeros(highest + 1, dtype=bool)
    present[counts] = True
    if ranks is not None:
        present = ranks.max(torch.from_numpy(present.view(np.uint8))).numpy().view(bool)
    rank_of_count = np.cumsum(present, dtype=dtype)  # at most T distinct counts: dtype holds them
    levels = int(rank_of_count[-1])
    rank_of_count -= 1
    return rank_of_count[counts], levels


def _ranges(start: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query row, flat index) of every index in start[i]..stop[i]-1, row by row. [L] each."""
    lengths = stop - start
    rows = np.repeat(np.arange(len(lengths)), lengths)
    flat = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths) + np.repeat(start, lengths)
    return rows, flat.astype(np.int64)


class _Popularity:
    """Popularity ranks of the targets `first_target ..` (all of them in one process), read
    by target ID: -inf for a target outside them (another rank's, on several ranks)."""

    _pop_T: torch.Tensor
    _first: int

    def _set_popularity(self, counts: np.ndarray, first_target: int, ranks: Ranks | None) -> int:
        """Sets the ranks; returns the number of distinct counts over every rank."""
        pop, levels = popularity_levels(counts, ranks)
        self._pop_T, self._first = torch.from_numpy(pop), first_target
        return levels

    def _popularity(self, target_ids: torch.Tensor) -> torch.Tensor:
        """[N] float64 popularity rank of each ID."""
        index = target_ids - self._first
        inside = (index >= 0) & (index < len(self._pop_T))
        if bool(inside.all()):
            return self._pop_T[index].to(torch.float64)
        pop = torch.full(target_ids.shape, float("-inf"), dtype=torch.float64)
        pop[inside] = self._pop_T[index[inside]].to(torch.float64)
        return pop


@dataclass
class MostPopularScorer(_Popularity):
    counts: np.ndarray  # training-event count per target index, from `first_target` on
    first_target: int = 0
    ranks: Ranks | None = None  # when each rank holds some targets' counts (popularity agreed)

    def __post_init__(self) -> None:
        self._set_popularity(self.counts, self.first_target, self.ranks)

    def query_state(self, queries: slice) -> int:
        return queries.stop - queries.start

    def score(self, num_queries: int, candidate_ids: torch.Tensor) -> torch.Tensor:
        # A tensor of its own (the evaluation writes into it), not an expanded view.
        return self._popularity(candidate_ids).expand(num_queries, -1).clone()

    def score_pairs(self, num_queries: int, target_ids: torch.Tensor) -> torch.Tensor:
        return self._popularity(target_ids)


@dataclass(frozen=True)
class SeenScores:
    """The chunk's (query row, target, primary key) triples, sorted by (row, target)."""

    num_queries: int
    rows: torch.Tensor
    targets: torch.Tensor
    primary: torch.Tensor


def _decayed_counts(
    num_queries: int, rows: np.ndarray, targets: np.ndarray, age: np.ndarray, half_life_events: float
) -> SeenScores:
    """The primary key of each (query row, target) of a stream: the dense rank, within the
    query, of sum over its events of 0.5 ** (age / half-life); 1 for the query's lowest, so
    that a target not in the stream (primary 0) is below every one in it. [L] inputs:
    `age` = the number of newer events in the query's stream (0 for the newest)."""
    # 0.5 ** (age / inf) = 1 for every age: a plain count.
    frame = pl.DataFrame({"row": rows, "target": targets, "weight": 0.5 ** (age / half_life_events)})
    per_target = frame.group_by("row", "target").agg(pl.col("weight").sum())
    per_target = per_target.with_columns(
        primary=pl.col("weight").rank("dense").over("row").cast(pl.Int64)
    ).sort("row", "target")
    return SeenScores(
        num_queries=num_queries,
        rows=torch.from_numpy(per_target["row"].to_numpy().astype(np.int64)),
        targets=torch.from_numpy(per_target["target"].to_numpy().astype(np.int64)),
        primary=torch.from_numpy(per_target["primary"].to_numpy().astype(np.float64)),
    )


class _DecayedCountScorer(_Popularity):
    """Score = primary (a query's decayed count rank, 0 when unseen) * (P + 1) + popularity
    rank. Subclasses call `_set_base` and build `SeenScores`."""

    _base: float

    def _set_base(self, counts: np.ndarray, first_target: int, ranks: Ranks | None) -> None:
        # P + 1 = the number of distinct counts: the same on every rank.
        self._base = float(max(self._set_popularity(counts, first_target, ranks), 1))

    def score(self, state: SeenScores, candidate_ids: torch.Tensor) -> torch.Tensor:
        scores = self._popularity(candidate_ids).expand(state.num_queries, -1).clone()
        column = torch.searchsorted(candidate_ids, state.targets).clamp(max=len(candidate_ids) - 1)
        hit = candidate_ids[column] == state.targets
        scores[state.rows[hit], column[hit]] += state.primary[hit] * self._base
        return scores

    def score_pairs(self, state: SeenScores, target_ids: torch.Tensor) -> torch.Tensor:
        scores = self._popularity(target_ids)
        hit = state.targets == target_ids[state.rows]
        scores[state.rows[hit]] += state.primary[hit] * self._base
        return scores


@dataclass
class RecencyFrequencyScorer(_DecayedCountScorer):
    """Query i's history is `history_targets[history_start[i]:position[i]]` (time order)."""

    counts: np.ndarray  # training-event count per target index, from `first_target` on
    history_targets: np.ndarray  # [N] flat target of every event
    history_start: np.ndarray  # [Q] flat index of each query's first history event
    position: np.ndarray  # [Q] flat index of the event to predict (history ends before it)
    half_life_events: float = 1.0
    first_target: int = 0  # `counts` are of the targets from this one on
    ranks: Ranks | None = None  # when each rank holds some targets' counts (popularity agreed)

    def __post_init__(self) -> None:
        self._set_base(self.counts, self.first_target, self.ranks)

    def query_state(self, queries: slice) -> SeenScores:
        stop = self.position[queries]
        rows, flat = _ranges(self.history_start[queries], stop)
        age = stop[rows] - 1 - flat  # newer events of the actor after this one
        return _decayed_counts(len(stop), rows, self.history_targets[flat], age, self.half_life_events)


@dataclass(frozen=True)
class IncomingEvents:
    """Events that reached people, any order: `senders[j] -> receivers[j]` at
    `timestamps[j]`, `rows[j]` its row in the original file. [M] each, one ID space."""

    receivers: np.ndarray
    senders: np.ndarray
    timestamps: np.ndarray
    rows: np.ndarray


@dataclass
class TwoWayRecencyFrequencyScorer(_DecayedCountScorer):
    """Recency-frequency over the actor's own events and the events that reached it.

    NOTE: needs one ID space for actors and targets: a sender's actor index must be the
    same person's target index.

    Query i (actor `event_actor[position[i]]`, asked at `event_timestamps[position[i]]`)
    reads:
    - its own events, flat `history_start[i] .. position[i]-1` (contact: their target);
    - every event of `incoming` with the actor as receiver and a timestamp strictly
      before the query's (contact: the sender). `incoming` must hold only the events the
      split has released (training events for a validation query, every non-test event
      for a test query): this scorer reads every one it is given.
    The two are merged in (timestamp, row) order and scored as `RecencyFrequencyScorer`
    scores the own events alone: age = newer events in the merged stream.

        own events (actor a):  a->b (t1, row 1)   a->c (t4, row 5)
        incoming to a:         b->a (t2, row 2)   c->a (t3, row 3)   d->a (t6, row 7)
        query (a, time t5):    stream b b c c (t1 t2 t3 t4), ages 3 2 1 0; d not yet

    A self-message (a -> a) in `incoming` is skipped: it is one of the actor's own events.
    """

    counts: np.ndarray  # known-event count per target index, from `first_target` on (popularity)
    event_actor: np.ndarray  # [N] flat actor index of every event (actor order)
    event_targets: np.ndarray  # [N] flat target index
    event_timestamps: np.ndarray  # [N] flat timestamp
    event_rows: np.ndarray  # [N] flat row in the original file (breaks timestamp ties)
    incoming: IncomingEvents  # [M] the released events that reached anyone
    history_start: np.ndarray  # [Q] flat index of each query's first own event
    position: np.ndarray  # [Q] flat index of the event to predict
    half_life_events: float = 1.0
    first_target: int = 0  # `counts` are of the targets from this one on
    ranks: Ranks | None = None  # when each rank holds some targets' counts (popularity agreed)

    def __post_init__(self) -> None:
        self._set_base(self.counts, self.first_target, self.ranks)
        self._query_actor = self.event_actor[self.position]
        self._query_time = self.event_timestamps[self.position]
        # The incoming events jagged by receiver, each receiver's in (timestamp, row) order.
        incoming = self.incoming
        keep = np.flatnonzero(incoming.senders != incoming.receivers)
        keep = keep[np.lexsort((incoming.rows[keep], incoming.timestamps[keep], incoming.receivers[keep]))]
        receiver = incoming.receivers[keep].astype(np.int64)
        self._senders = incoming.senders[keep].astype(np.int64)
        self._timestamps = incoming.timestamps[keep].astype(np.int64)
        self._rows = incoming.rows[keep].astype(np.int64)
        num_people = int(max(receiver.max(initial=-1), self._query_actor.max(initial=-1))) + 1
        self._offsets = np.r_[0, np.cumsum(np.bincount(receiver, minlength=num_people))].astype(np.int64)
        # One sorted key per incoming event, (receiver, rank of its timestamp): a single
        # binary search finds where "strictly before t" ends in any receiver's segment.
        self._times, time_rank = np.unique(self._timestamps, return_inverse=True)
        self._stride = len(self._times) + 1
        self._keys = receiver * self._stride + time_rank.reshape(-1)

    def query_state(self, queries: slice) -> SeenScores:
        actor, time = self._query_actor[queries], self._query_time[queries]
        own_rows, own = _ranges(self.history_start[queries], self.position[queries])
        end = np.searchsorted(
            self._keys, actor * self._stride + np.searchsorted(self._times, time, side="left"), side="left"
        )
        in_rows, reached = _ranges(self._offsets[actor], end)
        rows = np.concatenate([own_rows, in_rows])
        contacts = np.concatenate([self.event_targets[own], self._senders[reached]])
        timestamps = np.concatenate([self.event_timestamps[own], self._timestamps[reached]])
        file_rows = np.concatenate([self.event_rows[own], self._rows[reached]])
        order = np.lexsort((file_rows, timestamps, rows))
        rows, contacts = rows[order], contacts[order]
        ends = np.cumsum(np.bincount(rows, minlength=len(actor)))
        age = ends[rows] - 1 - np.arange(len(rows))  # newer events of the merged stream
        return _decayed_counts(len(actor), rows, contacts, age, self.half_life_events)
