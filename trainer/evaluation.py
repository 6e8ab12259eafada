"""Exact full-ranking evaluation, as ../shared/BENCHMARK.md defines it.

rank r = 1 + number of candidates other than the true target whose score is >= the
true target's score (ties count against the model: a constant scorer ranks last).

Scores are computed in chunks of `query_chunk_size x candidate_chunk_size`, so memory
is bounded by the chunk sizes whatever the vocabulary size. The true target's score is
computed as the candidates' scores it is compared with are: by a product of the count's
chunk shape (the chunk that holds it, or a chunk of the targets padded to that width).
A score computed another way (a multiply-and-sum instead of the chunk's matrix product,
or a matrix product of another shape) differs in the last bits, and a model that gives
every candidate the same vector would then rank first for a share of its queries
instead of last. So a query chunk's true scores are computed first, in a chunk of the
count's width (see `_true_scores`), then every chunk is counted. Only a target that is
no candidate (it can't be tied with one) is scored by `score_pairs`.

A scorer is anything with:
    query_state(query_slice) -> state           # e.g. the query vectors of the chunk
    score(state, candidate_ids [C] int64) -> [Q, C] float, a tensor of its own: the
                                                evaluation overwrites excluded entries;
                                                the IDs are sorted, the last may repeat
    score_pairs(state, target_ids [Q] int64) -> [Q] float, for targets that are no candidate

`full_ranking_ranks_at_bonus_shifts` ranks at several shifts of the contacts' bonuses in
one pass (the contact offset chosen on validation), with a `BonusShiftScorer`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

METRIC_NAMES = ("hr@1", "hr@10", "hr@50", "ndcg@10", "mrr", "mean_rank")


class RankingScorer(Protocol):
    def query_state(self, queries: slice) -> Any: ...

    def score(self, state: Any, candidate_ids: torch.Tensor) -> torch.Tensor: ...

    def score_pairs(self, state: Any, target_ids: torch.Tensor) -> torch.Tensor: ...


class BonusShiftScorer(RankingScorer, Protocol):
    """A scorer whose scores are a product plus per-(query, candidate) contact bonuses."""

    def score(self, state: Any, candidate_ids: torch.Tensor, with_bonus: bool = True) -> torch.Tensor: ...

    def score_pairs(self, state: Any, target_ids: torch.Tensor, with_bonus: bool = True) -> torch.Tensor: ...

    def contact_bonus(self, state: Any, sorted_candidates: torch.Tensor) -> ColumnPairs | None:
        """(query row, column among `sorted_candidates`, bonus) of the chunk's contacts."""
        ...

    def target_bonus(self, state: Any, target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([Q] bonus of each query's pair with its target, 0 where none; [Q] bool: a pair)."""
        ...


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
    # int32 sums: measured 35% faster than the default int64 (a chunk has < 2^31 columns).
    return (scores_QC >= true_Q[:, None]).sum(dim=1, dtype=torch.int32)


@dataclass(frozen=True)
class ColumnPairs:
    """(query row, candidate) pairs of one query chunk, located once in the sorted
    candidates and ordered by column, so each candidate chunk takes its own pairs with two
    binary searches (with 1,024-candidate chunks, locating every pair in every chunk cost
    more than the scoring). `values`: one number per pair, or None."""

    rows: torch.Tensor
    columns: torch.Tensor
    values: torch.Tensor | None = None

    @staticmethod
    def locate(
        sorted_candidates: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, values: torch.Tensor | None = None
    ) -> ColumnPairs:
        """The pairs whose id is a candidate (the others are dropped)."""
        if len(sorted_candidates) == 0:
            hit = torch.zeros_like(ids, dtype=torch.bool)
            column = torch.zeros_like(ids)
        else:
            column = torch.searchsorted(sorted_candidates, ids).clamp(max=len(sorted_candidates) - 1)
            hit = sorted_candidates[column] == ids
        order = torch.argsort(column[hit], stable=True)
        return ColumnPairs(
            rows[hit][order], column[hit][order], None if values is None else values[hit][order]
        )

    def in_range(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(rows, columns - start, values) of the pairs with start <= column < stop."""
        bounds = torch.searchsorted(self.columns, torch.tensor([start, stop], dtype=self.columns.dtype))
        lo, hi = int(bounds[0]), int(bounds[1])
        values = None if self.values is None else self.values[lo:hi]
        return self.rows[lo:hi], self.columns[lo:hi] - start, values


def excluded_pairs(sorted_candidates: torch.Tensor, rows: slice, true_Q: torch.Tensor, seen: SeenTargets | None) -> ColumnPairs:
    """The columns that must not count for a query chunk: the true target itself, plus
    (exclude-seen mode) the query's past targets."""
    query_rows, targets = torch.arange(len(true_Q)), true_Q
    if seen is not None:
        start, stop = seen.offsets[rows.start], seen.offsets[rows.stop]
        seen_rows = torch.repeat_interleave(
            torch.arange(rows.stop - rows.start), torch.from_numpy(np.diff(seen.offsets[rows.start : rows.stop + 1]))
        )
        query_rows = torch.cat([query_rows, seen_rows])
        targets = torch.cat([targets, torch.from_numpy(seen.targets[start:stop])])
    return ColumnPairs.locate(sorted_candidates, query_rows, targets)


# Chunk widths are a multiple of this: a matrix product rounds the columns past the last
# full SIMD block differently from the others (measured on this CPU: within one product of
# width 5-7 or 9-11, the tail columns of identical vectors scored differently).
WIDTH_MULTIPLE = 16


@dataclass(frozen=True)
class CandidateChunks:
    """The column ranges of the sorted candidates scored at once. Every chunk, on every
    rank, has the same width, a multiple of WIDTH_MULTIPLE: a matrix product of another
    shape takes another BLAS path and rounds differently, and a tie must stay a tie
    whichever chunks (and ranks) its two sides fall in. Chunks are `width` apart; the last
    one starts `width` before the end, its first `overlap` columns (the previous chunk's)
    not counted; fewer candidates than `width` make one chunk padded with the last ID, the
    padding not counted."""

    num_candidates: int
    width: int

    @staticmethod
    def agreed(
        num_candidates: int, size: int, width_max: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> CandidateChunks:
        """Width min(size, candidates), the largest over ranks (`width_max`), rounded up."""
        width = min(size, num_candidates)
        if width_max is not None:
            width = int(width_max(torch.tensor(float(width))))
        return CandidateChunks(num_candidates, max(-(-width // WIDTH_MULTIPLE), 1) * WIDTH_MULTIPLE)

    @property
    def _last(self) -> int:
        return max(self.num_candidates - self.width, 0)

    def starts(self) -> list[int]:
        return [self.start_of(c) for c in range(0, self.num_candidates, self.width)]

    def start_of(self, column: int | torch.Tensor):
        """Start of the chunk whose counted columns hold `column`."""
        if isinstance(column, torch.Tensor):
            return torch.clamp((column // self.width) * self.width, max=self._last)
        return min((column // self.width) * self.width, self._last)

    def uncounted(self, start: int) -> tuple[int, int]:
        """(leading columns an earlier chunk counts, first padding column) of a chunk."""
        overlap = (-start) % self.width if self.num_candidates > self.width and start == self._last else 0
        return overlap, min(self.width, self.num_candidates - start)

    def ids(self, sorted_ids: torch.Tensor, start: int) -> torch.Tensor:
        return pad_to_width(sorted_ids[start : start + self.width], self.width)


def pad_to_width(ids: torch.Tensor, width: int) -> torch.Tensor:
    """Sorted `ids` padded to `width` with its last ID: sorted still (a scorer can locate
    them), and a repeat is never read or counted. A full chunk is returned as it is: the
    count loop's chunks stay views, which the scorer recognises as contiguous runs."""
    if len(ids) == width:
        return ids
    return torch.cat([ids, ids[-1:].expand(width - len(ids))])


def sorted_ids(ids: np.ndarray) -> torch.Tensor:
    """[C] int64 `ids` in ascending order as a tensor, sharing their memory when they are
    sorted already (candidates built from the mask, and a rank's share of them), else a
    sorted copy. Candidate IDs are the one [C] array of an evaluation: a copy per user
    of them was a copy of the rank's whole share (40 MB for 5e6 candidates)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) > 1 and not bool((ids[1:] >= ids[:-1]).all()):
        ids = np.sort(ids)
    with warnings.catch_warnings():
        # A prepared dataset's arrays are read-only views of its columns; nothing writes to these.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(ids)


def full_ranking_ranks(
    scorer: RankingScorer,
    true_targets: np.ndarray,
    candidates: np.ndarray,
    *,
    query_chunk_size: int = 1024,
    candidate_chunk_size: int = 65536,
    seen: SeenTargets | None = None,
    count_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    score_max: Callable[[torch.Tensor], torch.Tensor] | None = None,
    bonus_shifts: tuple[float, ...] | None = None,
) -> np.ndarray:
    """Rank of each query's true target among `candidates` (sorted target IDs). [Q] int64.
    On several ranks, each scoring its own share of the candidates, `count_sum` sums the
    per-query counts over ranks and `score_max` takes the true scores from the rank whose
    share holds the target (the others give -inf) and agrees the chunk width; every rank
    then returns the global ranks. Both are needed together. With `bonus_shifts`, [K, Q],
    the ranks at each shift: see `full_ranking_ranks_at_bonus_shifts`."""
    if (count_sum is None) != (score_max is None):
        raise ValueError("full_ranking_ranks: count_sum and score_max go together (several ranks) or not at all")
    candidates_t = sorted_ids(candidates)
    chunks = CandidateChunks.agreed(len(candidates_t), candidate_chunk_size, score_max)
    num_queries = len(true_targets)
    ranks = np.empty((1 if bonus_shifts is None else len(bonus_shifts), num_queries), dtype=np.int64)
    for q0 in range(0, num_queries, query_chunk_size):
        rows = slice(q0, min(q0 + query_chunk_size, num_queries))
        state = scorer.query_state(rows)
        true_Q = torch.from_numpy(np.asarray(true_targets[rows], dtype=np.int64))
        shifted = None if bonus_shifts is None else _ShiftedBonus(scorer, state, bonus_shifts, candidates_t)
        true_score_Q, kept = _true_scores(scorer, state, candidates_t, chunks, true_Q, score_max, shifted is None)
        true_KQ = true_score_Q[None] if shifted is None else shifted.true_scores(true_score_Q, true_Q)
        count_KQ = torch.zeros(true_KQ.shape, dtype=torch.int64)
        excluded = excluded_pairs(candidates_t, rows, true_Q, seen)
        # The kept chunk first, so at most one [Q, C] chunk besides it is ever alive.
        starts = chunks.starts()
        if kept is not None:
            starts.remove(kept[0])
            starts.insert(0, kept[0])
        for c0 in starts:
            if kept is not None and kept[0] == c0:
                scores_QC, kept = kept[1], None
            elif shifted is None:
                scores_QC = scorer.score(state, chunks.ids(candidates_t, c0))
            else:
                scores_QC = scorer.score(state, chunks.ids(candidates_t, c0), with_bonus=False)
            # Excluded columns set to NaN in the chunk's own scores (NaN never counts): a
            # scatter of a few entries, not a [Q, C] mask.
            excluded_rows, excluded_columns, _ = excluded.in_range(c0, c0 + chunks.width)
            scores_QC[excluded_rows, excluded_columns] = float("nan")
            overlap, padding = chunks.uncounted(c0)
            scores_QC[:, :overlap] = float("nan")
            scores_QC[:, padding:] = float("nan")
            # The true scores were read from scores of this dtype: the cast back is exact.
            if shifted is None:
                count_KQ[0] += count_at_least(scores_QC, true_KQ[0].to(scores_QC.dtype))
            else:
                count_KQ += shifted.count(scores_QC, c0, chunks.width, true_KQ)
        if count_sum is not None:
            count_KQ = count_sum(count_KQ)
        ranks[:, rows] = (count_KQ + 1).numpy()
    return ranks[0] if bonus_shifts is None else ranks


def full_ranking_ranks_at_bonus_shifts(
    scorer: BonusShiftScorer,
    true_targets: np.ndarray,
    candidates: np.ndarray,
    shifts: Sequence[float],
    **options: Any,
) -> dict[float, np.ndarray]:
    """`full_ranking_ranks` (same `options`) with each shift added to every contact's
    bonus: {shift: [Q] ranks}, from one pass. Each chunk is scored once without the
    bonuses; the columns of no contact score the same at every shift and are counted
    against each shift's true score, and each contact's score is made for each shift as
    the scorer makes it, chunk score + (bonus + shift), so every shift's ranks are bitwise
    those of a scorer whose bonuses carry the shift (the model at that contact offset),
    for one score matrix instead of one per shift."""
    shifts = tuple(float(shift) for shift in shifts)
    ranks = full_ranking_ranks(scorer, true_targets, candidates, bonus_shifts=shifts, **options)
    return {shift: ranks[k] for k, shift in enumerate(shifts)}


class _ShiftedBonus:
    """One query chunk's contact bonuses at each shift, for `full_ranking_ranks_at_bonus_shifts`."""

    def __init__(self, scorer: BonusShiftScorer, state: Any, shifts: tuple[float, ...], candidates_t: torch.Tensor) -> None:
        self.scorer, self.state, self.shifts = scorer, state, shifts
        self.contacts: ColumnPairs | None = scorer.contact_bonus(state, candidates_t)

    def true_scores(self, unbonused_Q: torch.Tensor, true_Q: torch.Tensor) -> torch.Tensor:
        """[K, Q] float64 true scores at each shift, from the scores without the bonus (read
        from fp32 chunks: exact in fp32 again), a target that is a contact given its bonus
        plus the shift as a chunk gives it."""
        bonus_Q, has_Q = self.scorer.target_bonus(self.state, true_Q)
        score_Q = unbonused_Q.to(bonus_Q.dtype)
        true_KQ = torch.stack([torch.where(has_Q, score_Q + (bonus_Q + shift), score_Q).double() for shift in self.shifts])
        # A NaN bonus makes the true score NaN: -inf, as `_true_scores` makes a NaN score
        # (every candidate beats it, the contacts' own comparisons included).
        return torch.nan_to_num(true_KQ, nan=float("-inf"))

    def count(self, scores_QC: torch.Tensor, c0: int, width: int, true_KQ: torch.Tensor) -> torch.Tensor:
        """[K, Q] candidates at least as high as the true target in this chunk (scores
        without the bonus, excluded and uncounted columns NaN), at each shift: the columns
        of no contact as they are, each contact at score + (bonus + shift). Overwrites the
        contacts' columns of `scores_QC` with NaN."""
        rows_U = columns_U = bonus_U = None
        if self.contacts is not None:
            rows_U, columns_U, bonus_U = self.contacts.in_range(c0, c0 + width)
            contact_U = scores_QC[rows_U, columns_U]  # NaN where excluded or uncounted
            scores_QC[rows_U, columns_U] = float("nan")
        counts = []
        for k, shift in enumerate(self.shifts):
            true_Q = true_KQ[k].to(scores_QC.dtype)
            count_Q = count_at_least(scores_QC, true_Q).to(torch.int64)
            if rows_U is not None:
                hits_U = (contact_U + (bonus_U + shift)) >= true_Q[rows_U]
                count_Q.index_add_(0, rows_U, hits_U.to(torch.int64))
            counts.append(count_Q)
        return torch.stack(counts)


def _true_scores(
    scorer: RankingScorer,
    state: Any,
    candidates_t: torch.Tensor,
    chunks: CandidateChunks,
    true_Q: torch.Tensor,
    score_max: Callable[[torch.Tensor], torch.Tensor] | None,
    with_bonus: bool = True,
) -> tuple[torch.Tensor, tuple[int, torch.Tensor] | None]:
    """Each query's true score as the count's chunks compute it, in float64 (exact for any
    score dtype, and one dtype on every rank for `score_max`; -inf where this scorer's
    candidates don't hold the target: another rank's share), and the chunk scored for it,
    (start, scores), when it is one of the count's chunks, for the count to reuse. A NaN
    true score becomes -inf: every candidate then beats it (a broken model ranks last).

    When every held target lies in one chunk (always so for a vocabulary of one chunk),
    that chunk is scored and kept: the true scores are the count's own numbers. Otherwise
    the targets are scored as a chunk of their own, padded to the same width: the same
    matrix-product shape computes each entry alike wherever its column sits (tested),
    while scoring every chunk that holds a target instead made the ranking 1.45x slower
    (bench/eval.py's 1e6 candidates, 1,024 queries; this way 1.04-1.08x, in one run).
    Without `with_bonus`, the scores without the contacts' bonuses."""
    score = scorer.score if with_bonus else functools.partial(scorer.score, with_bonus=False)
    score_pairs = scorer.score_pairs if with_bonus else functools.partial(scorer.score_pairs, with_bonus=False)
    true_score_Q = torch.full((len(true_Q),), float("-inf"), dtype=torch.float64)
    held_Q = torch.zeros(len(true_Q), dtype=torch.bool)
    kept = None
    if len(candidates_t) > 0:
        column_Q = torch.searchsorted(candidates_t, true_Q).clamp(max=len(candidates_t) - 1)
        held_Q = candidates_t[column_Q] == true_Q
        start_Q = chunks.start_of(column_Q)
        starts = torch.unique(start_Q[held_Q]).tolist()
        if len(starts) == 1:
            c0 = starts[0]
            scores_QC = score(state, chunks.ids(candidates_t, c0))
            true_score_Q[held_Q] = scores_QC[held_Q, column_Q[held_Q] - c0].double()
            kept = (c0, scores_QC)
        elif starts:
            targets = torch.unique(true_Q[held_Q])  # sorted
            for t0 in range(0, len(targets), chunks.width):
                ids = pad_to_width(targets[t0 : t0 + chunks.width], chunks.width)
                scores_QT = score(state, ids)
                rows = torch.nonzero(held_Q & (true_Q >= ids[0]) & (true_Q <= ids[-1])).squeeze(1)
                true_score_Q[rows] = scores_QT[rows, torch.searchsorted(ids, true_Q[rows])].double()
    true_score_Q = torch.nan_to_num(true_score_Q, nan=float("-inf"))
    if score_max is not None:
        true_score_Q = score_max(true_score_Q)
        held_Q = score_max(held_Q.to(torch.int32)).bool()
    if not bool(held_Q.all()):
        # Targets that are no candidate (the same decision on every rank, as score_pairs
        # may look up vectors collectively).
        pairs_Q = torch.nan_to_num(score_pairs(state, true_Q).double(), nan=float("-inf"))
        true_score_Q = torch.where(held_Q, true_score_Q, pairs_Q)
    return true_score_Q, kept


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
