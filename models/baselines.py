"""The two simple baselines every quality table carries (../shared/BENCHMARK.md).

- `MostPopularScorer`: targets ranked by training-event count.
- `RecencyFrequencyScorer`: the actor's own past targets ranked by a count decayed
  with recency (weight 0.5 ** (newer events / half-life)); ties, and every target
  the actor has not interacted with, ordered by popularity.

Both are `RankingScorer`s for `trainer/evaluation.py`. Scores are exact integers in
float64 (lexicographic keys encoded as `primary * (P + 1) + popularity_rank`), so ties
are ties and nothing depends on float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch


def popularity_rank(counts: np.ndarray) -> np.ndarray:
    """Dense rank of counts: 0 for the least counted, equal counts share a rank. [T] int64."""
    _, inverse = np.unique(counts, return_inverse=True)
    return inverse.astype(np.int64)


@dataclass
class MostPopularScorer:
    counts: np.ndarray  # [T] training-event count per target index

    def __post_init__(self) -> None:
        self._score_T = torch.from_numpy(popularity_rank(self.counts).astype(np.float64))

    def query_state(self, queries: slice) -> int:
        return queries.stop - queries.start

    def score(self, num_queries: int, candidate_ids: torch.Tensor) -> torch.Tensor:
        # A tensor of its own (the evaluation writes into it), not an expanded view.
        return self._score_T[candidate_ids].expand(num_queries, -1).clone()

    def score_pairs(self, num_queries: int, target_ids: torch.Tensor) -> torch.Tensor:
        return self._score_T[target_ids]


@dataclass(frozen=True)
class _SeenScores:
    """The chunk's (query row, target, primary key) triples, sorted by (row, target)."""

    num_queries: int
    rows: torch.Tensor
    targets: torch.Tensor
    primary: torch.Tensor


@dataclass
class RecencyFrequencyScorer:
    """Query i's history is `history_targets[history_start[i]:position[i]]` (time order)."""

    counts: np.ndarray  # [T] training-event count per target index
    history_targets: np.ndarray  # [N] flat target of every event
    history_start: np.ndarray  # [Q] flat index of each query's first history event
    position: np.ndarray  # [Q] flat index of the event to predict (history ends before it)
    half_life_events: float = 1.0

    def __post_init__(self) -> None:
        self._pop_T = popularity_rank(self.counts)
        self._base = float(self._pop_T.max() + 1)

    def query_state(self, queries: slice) -> _SeenScores:
        start, stop = self.history_start[queries], self.position[queries]
        lengths = stop - start
        rows = np.repeat(np.arange(len(lengths)), lengths)
        flat = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths) + np.repeat(start, lengths)
        age = np.repeat(stop, lengths) - 1 - flat  # newer events of the actor after this one
        frame = pl.DataFrame(
            {"row": rows, "target": self.history_targets[flat], "weight": 0.5 ** (age / self.half_life_events)}
        )
        per_target = frame.group_by("row", "target").agg(pl.col("weight").sum())
        # Dense rank of the decayed count within each query: 1 for its lowest, so that an
        # unseen target (primary 0) is below every seen one.
        per_target = per_target.with_columns(
            primary=pl.col("weight").rank("dense").over("row").cast(pl.Int64)
        ).sort("row", "target")
        return _SeenScores(
            num_queries=len(lengths),
            rows=torch.from_numpy(per_target["row"].to_numpy().astype(np.int64)),
            targets=torch.from_numpy(per_target["target"].to_numpy().astype(np.int64)),
            primary=torch.from_numpy(per_target["primary"].to_numpy().astype(np.float64)),
        )

    def score(self, state: _SeenScores, candidate_ids: torch.Tensor) -> torch.Tensor:
        pop = torch.from_numpy(self._pop_T)[candidate_ids].to(torch.float64)
        scores = pop.expand(state.num_queries, -1).clone()
        column = torch.searchsorted(candidate_ids, state.targets).clamp(max=len(candidate_ids) - 1)
        hit = candidate_ids[column] == state.targets
        scores[state.rows[hit], column[hit]] += state.primary[hit] * self._base
        return scores

    def score_pairs(self, state: _SeenScores, target_ids: torch.Tensor) -> torch.Tensor:
        scores = torch.from_numpy(self._pop_T)[target_ids].to(torch.float64)
        hit = state.targets == target_ids[state.rows]
        scores[state.rows[hit]] += state.primary[hit] * self._base
        return scores
