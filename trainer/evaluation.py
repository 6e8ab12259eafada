"""Exact full-ranking evaluation, as ../shared/BENCHMARK.md defines it.

rank r = 1 + number of candidates other than the true target whose score is >= the
true target's score (ties count against the model: a constant scorer ranks last).

Scores are computed in chunks of `query_chunk_size x candidate_chunk_size`, so memory
is bounded by the chunk sizes whatever the vocabulary size. The true target's score
comes from `score_pairs` and the true target's own column is masked out of the
count, so the rank never depends on which chunk holds the target.

A scorer is anything with:
    query_state(query_slice) -> state           # e.g. the query vectors of the chunk
    score(state, candidate_ids [C] int64) -> [Q, C] float, a tensor of its own: the
                                                evaluation overwrites excluded entries
    score_pairs(state, target_ids [Q] int64) -> [Q] float
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

METRIC_NAMES = ("hr@1", "hr@10", "hr@50", "ndcg@10", "mrr", "mean_rank")


class RankingScorer(Protocol):
    def query_state(self, queries: slice) -> Any: ...

    def score(self, state: Any, candidate_ids: torch.Tensor) -> torch.Tensor: ...

    def score_pairs(self, state: Any, target_ids: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class SeenTargets:
    """Each query's past targets (jagged), for the optional exclude-seen mode."""

    offsets: np.ndarray  # [Q + 1]
    targets: np.ndarray  # [sum of lengths]


def count_at_least(scores_QC: torch.Tensor, true_Q: torch.Tensor) -> torch.Tensor:
    """Per query, how many candidates score >= the true score. Excluded columns hold NaN,
    which compares False. A NaN true score counts as -inf: every candidate beats it (a
    broken model ranks last, never first)."""
    true_Q = torch.nan_to_num(true_Q, nan=float("-inf"))
    return (scores_QC >= true_Q[:, None]).sum(dim=1)


def exclude_in_place(
    scores_QC: torch.Tensor, rows: slice, candidate_ids: torch.Tensor, true_Q: torch.Tensor, seen: SeenTargets | None
) -> torch.Tensor:
    """Set to NaN, in place, the columns that must not count: the true target itself, plus
    (exclude-seen mode) the query's past targets. A scatter of at most Q + seen entries
    instead of a [Q, C] mask: the chunk's scores are the only [Q, C] array touched."""
    query_rows, targets = torch.arange(len(true_Q)), true_Q
    if seen is not None:
        start, stop = seen.offsets[rows.start], seen.offsets[rows.stop]
        seen_rows = torch.repeat_interleave(
            torch.arange(rows.stop - rows.start), torch.from_numpy(np.diff(seen.offsets[rows.start : rows.stop + 1]))
        )
        query_rows = torch.cat([query_rows, seen_rows])
        targets = torch.cat([targets, torch.from_numpy(seen.targets[start:stop])])
    # candidate_ids is sorted: locate each target's column in this chunk, if any.
    column = torch.searchsorted(candidate_ids, targets).clamp(max=len(candidate_ids) - 1)
    hit = candidate_ids[column] == targets
    scores_QC[query_rows[hit], column[hit]] = float("nan")
    return scores_QC


def full_ranking_ranks(
    scorer: RankingScorer,
    true_targets: np.ndarray,
    candidates: np.ndarray,
    *,
    query_chunk_size: int = 1024,
    candidate_chunk_size: int = 65536,
    seen: SeenTargets | None = None,
    count_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Rank of each query's true target among `candidates` (sorted target IDs). [Q] int64.
    `count_sum`: on several ranks, each scoring its own share of the candidates, sums the
    per-query counts over ranks (every rank then returns the global ranks)."""
    candidates_t = torch.from_numpy(np.sort(np.asarray(candidates, dtype=np.int64)))
    num_queries = len(true_targets)
    ranks = np.empty(num_queries, dtype=np.int64)
    for q0 in range(0, num_queries, query_chunk_size):
        rows = slice(q0, min(q0 + query_chunk_size, num_queries))
        state = scorer.query_state(rows)
        true_Q = torch.from_numpy(np.asarray(true_targets[rows], dtype=np.int64))
        true_score_Q = scorer.score_pairs(state, true_Q)
        count_Q = torch.zeros(rows.stop - rows.start, dtype=torch.int64)
        for c0 in range(0, len(candidates_t), candidate_chunk_size):
            chunk = candidates_t[c0 : c0 + candidate_chunk_size]
            scores_QC = exclude_in_place(scorer.score(state, chunk), rows, chunk, true_Q, seen)
            count_Q += count_at_least(scores_QC, true_score_Q)
        if count_sum is not None:
            count_Q = count_sum(count_Q)
        ranks[rows] = (count_Q + 1).numpy()
    return ranks


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    """HR@K, NDCG@K, MRR and mean rank of 1-based ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if len(ranks) == 0:
        return {name: math.nan for name in METRIC_NAMES}
    ndcg10 = np.where(ranks <= 10, 1.0 / np.log2(ranks + 1.0), 0.0)
    return {
        "hr@1": float(np.mean(ranks <= 1)),
        "hr@10": float(np.mean(ranks <= 10)),
        "hr@50": float(np.mean(ranks <= 50)),
        "ndcg@10": float(np.mean(ndcg10)),
        "mrr": float(np.mean(1.0 / ranks)),
        "mean_rank": float(np.mean(ranks)),
    }
