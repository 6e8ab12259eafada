"""The trained model as a `RankingScorer` for exact full-ranking evaluation.

score(x, c) = cos(q(x), c) / tau + bonus(x, c)   (bonus: repeat re-scoring, 0 off-history)

Candidate vectors are computed once per evaluation, in chunks; query vectors once per
query chunk. On several ranks each rank holds and scores the candidates whose table
rows it owns (trainer/distributed.py `owned_candidates`); the true scores come from the
owning rank and the per-query counts are summed across ranks (trainer/evaluation.py):
no rank holds every candidate vector.

Shape suffixes: Q queries, C candidates, D width, U history pairs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from configs.names import ACTOR, NEXT_ACTION, NEXT_TIMESTAMP, TARGET_TABLE
from data.activity import ContactActivity
from data.batches import BatchBuilder, BatchSpec
from data.incoming import Incoming
from data.sequences import Queries, Sequences
from trainer.distributed import Distributed, QueryGather, local_table_rows
from trainer.evaluation import ColumnPairs, sorted_ids
from models.retrieval import QueryEncoding, TwoTowerRetrieval


@dataclass
class _QueryChunk:
    query_over_tau_BD: torch.Tensor
    """Query vectors / tau: the [Q, D] side scaled once, not every [Q, C] chunk of scores."""
    pairs: _BonusPairs | None
    """Each (query, contact) pair's repeat bonus; rows count from the chunk's first query."""
    bonus: ColumnPairs | None
    """The same pairs located in the candidates."""


@dataclass
class _BonusPairs:
    """(row, target, bonus) of query-contact pairs, sorted by key = row * V + target."""

    row_U: torch.Tensor
    target_U: torch.Tensor
    bonus_U: torch.Tensor
    num_targets: int

    @property
    def key_U(self) -> torch.Tensor:
        return self.row_U * self.num_targets + self.target_U

    def sorted(self) -> _BonusPairs:
        order = torch.argsort(self.key_U, stable=True)
        return _BonusPairs(self.row_U[order], self.target_U[order], self.bonus_U[order], self.num_targets)

    def rows_in(self, start: int, stop: int) -> _BonusPairs:
        """The pairs of rows start..stop-1, their rows counted from `start`."""
        bounds = torch.searchsorted(self.row_U, torch.tensor([start, stop], dtype=self.row_U.dtype))
        lo, hi = int(bounds[0]), int(bounds[1])
        return _BonusPairs(self.row_U[lo:hi] - start, self.target_U[lo:hi], self.bonus_U[lo:hi], self.num_targets)

    def bonus_of(self, targets_Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([Q] the bonus of row q's pair with targets_Q[q], 0 where it has none; [Q] bool
        whether it has one)."""
        key_U = self.key_U
        if key_U.numel() == 0:
            return torch.zeros(len(targets_Q), dtype=self.bonus_U.dtype), torch.zeros(len(targets_Q), dtype=torch.bool)
        key_Q = torch.arange(len(targets_Q)) * self.num_targets + targets_Q
        index = torch.searchsorted(key_U, key_Q).clamp(max=key_U.numel() - 1)
        has_Q = key_U[index] == key_Q
        return torch.where(has_Q, self.bonus_U[index], 0.0), has_Q


# Candidate vectors are computed this many rows per candidate-tower call. The block's
# tower activations are the evaluation's largest temporaries and the same on every rank
# whatever its share: 65,536-row blocks put 0.08-0.16 GB on each rank's peak at 1e7 rows
# x D 64 (bench/scale.py). Nor are they slower: bench/eval.py computed its vectors in
# 4.2-6.6 s (1e6 x D 256) and 7.3-7.7 s (1e7 x D 64) with 8,192-row blocks against 7.2 and
# 10.4 s with 65,536, run back to back.
VECTOR_BLOCK_ROWS = 8192


class ModelScorer:
    def __init__(
        self,
        model: TwoTowerRetrieval,
        seqs: Sequences,
        queries: Queries,
        spec: BatchSpec,
        candidate_ids: np.ndarray,
        *,
        vector_chunk_size: int = VECTOR_BLOCK_ROWS,
        incoming: Incoming | None = None,
        activity: ContactActivity | None = None,
        dist: Distributed = Distributed(),
        queries_split_over_ranks: bool = False,
        query_chunk_size: int = 1024,
        max_held_bytes: float = float("inf"),
    ) -> None:
        """`candidate_ids`: the candidates this scorer scores (on several ranks, the ones
        this rank owns); their vectors are computed in blocks of `vector_chunk_size`, held
        when they take at most `max_held_bytes`, else computed again when scored
        (`CandidateVectors`). `spec`: what each query's batch carries (its random
        negatives are not drawn); `incoming`: the incoming events the queries may read
        (their last `spec.incoming_window` before each query's time go to the re-scorer);
        `activity`: the contacts' own activity, when the re-scorer reads it (a collective
        lookup per query chunk on several ranks, which every rank encodes in step).

        `queries_split_over_ranks`: each rank passes only its own actors' queries (its
        share of the log); each encodes its own, `query_chunk_size` at a time, and every
        rank then holds every query's vector and bonuses, gathered and put in actor order
        (what one process holding every query has): `true_targets` and `seen` give the
        gathered queries' targets and past targets. Otherwise every rank passes the same
        queries and each query chunk is encoded when the evaluation asks for it."""
        self.model = model
        self.activity = activity
        self.temperature = model.loss_settings.temperature
        self.builder = BatchBuilder(
            seqs, queries, dataclasses.replace(spec, num_rand_negs=0), active_pool=np.zeros(1, dtype=np.int64),
            incoming=incoming,
        )
        self.num_targets = seqs.num_targets
        self.candidate_ids = sorted_ids(candidate_ids)
        self.vectors = CandidateVectors(model, self.candidate_ids, vector_chunk_size, dist, max_held_bytes)
        self.dist = dist
        self.all_queries: _QueryChunk | None = None
        if queries_split_over_ranks:
            self.all_queries = self._encode_and_gather(seqs, queries, query_chunk_size, dist)

    @torch.no_grad()
    def _encode(self, rows: np.ndarray, builder: BatchBuilder | None = None) -> tuple[torch.Tensor, _BonusPairs | None]:
        """Query vectors / tau and bonus pairs (sorted by key) of queries `rows` (of
        `builder`'s queries; the scorer's own by default)."""
        batch = self.model.with_contact_activity((builder or self.builder).build(rows), self.activity)
        encoding = self.model.encode_queries(
            batch.query_values(ACTOR),
            batch.query_values(NEXT_ACTION),
            batch.history,
            batch.query_values(NEXT_TIMESTAMP),
            batch.incoming,
            batch.contact_activity,
        )
        pairs = None
        if encoding.history is not None:
            items = encoding.history  # sorted by row * V + target already
            pairs = _BonusPairs(items.row_U, items.target_U, encoding.bonus_U, items.num_targets)
        return encoding.query_BD / self.temperature, pairs

    def _encode_and_gather(self, seqs: Sequences, queries: Queries, chunk: int, dist: Distributed) -> _QueryChunk:
        """Encode this rank's queries (as many collective chunks as the rank with the most;
        a rank out of queries encodes a stand-in row and drops it), gather every rank's,
        and order them by actor, as one process holding every query orders them."""
        local = len(queries)
        num_chunks = int(dist.max(torch.tensor(-(-local // chunk))))
        vectors, pairs = [], []
        for i in range(num_chunks):
            rows = np.arange(i * chunk, min((i + 1) * chunk, local))
            if len(rows) == 0:  # TorchRec's lookups refuse an empty batch: encode one row, drop it
                self._encode(np.zeros(1, dtype=np.int64), None if local else self._stand_in(seqs))
                continue
            vector, pair = self._encode(rows)
            vectors.append(vector)
            if pair is not None:
                pairs.append(_BonusPairs(pair.row_U + int(rows[0]), pair.target_U, pair.bonus_U, self.num_targets))
        dim = self.model.model_config.embedding_dim
        local_QD = torch.cat(vectors) if vectors else torch.zeros(0, dim)
        self.gather = QueryGather.of(seqs.actor[queries.sequence], dist)
        gathered_QD = self.gather.values(local_QD)
        gathered_pairs = None
        if self.model.repeat is not None:
            row_U = torch.cat([p.row_U for p in pairs]) if pairs else torch.zeros(0, dtype=torch.int64)
            target_U = torch.cat([p.target_U for p in pairs]) if pairs else torch.zeros(0, dtype=torch.int64)
            bonus_U = torch.cat([p.bonus_U for p in pairs]) if pairs else torch.zeros(0)
            row_U = self.gather.rows(row_U)
            gathered_pairs = _BonusPairs(
                row_U, dist.gather_varying(target_U), dist.gather_varying(bonus_U), self.num_targets
            ).sorted()
        return _QueryChunk(gathered_QD, gathered_pairs, None)

    def _stand_in(self, seqs: Sequences) -> BatchBuilder:
        """For a rank holding no query, which must still join the collective lookups: a
        builder of one query, the last event of its longest sequence."""
        longest = int(np.argmax(seqs.lengths))
        start = int(seqs.offsets[longest])
        stand_in = Queries(
            sequence=np.array([longest]), position=np.array([start + int(seqs.lengths[longest]) - 1]),
            history_start=np.array([start]),
        )
        return dataclasses.replace(self.builder, queries=stand_in)

    def gathered_jagged(self, lengths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-query lists of this rank's queries (`lengths`, flat `values`), gathered and
        put in the scorer's query order: (offsets [Q + 1], flat values)."""
        return self.gather.jagged(lengths, values)

    def gathered(self, local: np.ndarray) -> np.ndarray:
        """A per-query array of this rank's queries, gathered from every rank and put in
        the scorer's query order (queries split over ranks only)."""
        return self.gather.values(local)

    def _run_start(self, ids: torch.Tensor) -> int | None:
        """Where `ids` starts among the scorer's sorted candidates, when it is a contiguous
        run of them (the evaluation walks them chunk by chunk, so it usually is); else None."""
        if len(ids) == 0:
            return None
        start = int(torch.searchsorted(self.candidate_ids, ids[:1]))
        run = self.candidate_ids[start : start + len(ids)]
        return start if len(run) == len(ids) and torch.equal(run, ids) else None

    @torch.no_grad()
    def query_state(self, rows: slice) -> _QueryChunk:
        if self.all_queries is not None:
            query_over_tau_BD = self.all_queries.query_over_tau_BD[rows]
            pairs = self.all_queries.pairs
            pairs = pairs.rows_in(rows.start, rows.stop) if pairs is not None else None
        else:
            query_over_tau_BD, pairs = self._encode(np.arange(rows.start, rows.stop))
        bonus = None
        if pairs is not None:
            bonus = ColumnPairs.locate(self.candidate_ids, pairs.row_U, pairs.target_U, pairs.bonus_U)
        return _QueryChunk(query_over_tau_BD, pairs, bonus)

    @torch.no_grad()
    def score(self, state: _QueryChunk, candidate_ids: torch.Tensor, with_bonus: bool = True) -> torch.Tensor:
        """[Q, C] scores; without the contacts' bonuses with `with_bonus=False` (the
        evaluation then adds them itself: trainer/evaluation.py `full_ranking_ranks_at_bonus_shifts`)."""
        start = self._run_start(candidate_ids)
        # A contiguous run: a view of the vectors and the bonus pairs found by two binary
        # searches; otherwise (any other candidate list) looked up one by one.
        if start is not None:
            vectors = self.vectors.run(start, start + len(candidate_ids))
        else:
            vectors = self.vectors.at(torch.searchsorted(self.candidate_ids, candidate_ids))
        scores_QC = state.query_over_tau_BD @ vectors.T
        if state.bonus is None or not with_bonus:
            return scores_QC
        if start is not None:
            rows, columns, bonus = state.bonus.in_range(start, start + len(candidate_ids))
        else:
            pairs = state.pairs
            located = ColumnPairs.locate(candidate_ids, pairs.row_U, pairs.target_U, pairs.bonus_U)
            rows, columns, bonus = located.rows, located.columns, located.values
        # In place: scores_QC is this call's own matmul output (a copy would be one more [Q, C] pass).
        return scores_QC.index_put_((rows, columns), bonus, accumulate=True)

    @torch.no_grad()
    def score_pairs(self, state: _QueryChunk, target_ids: torch.Tensor, with_bonus: bool = True) -> torch.Tensor:
        # Only for true targets that are no candidate (the evaluation reads the others from
        # its score chunks); looked up collectively, as such a target is held by no rank.
        scores_Q = (state.query_over_tau_BD * self.model.candidate_vectors(target_ids)).sum(-1)
        if state.pairs is not None and with_bonus:
            scores_Q = scores_Q + state.pairs.bonus_of(target_ids)[0]
        return scores_Q

    def contact_bonus(self, state: _QueryChunk, sorted_candidates: torch.Tensor) -> ColumnPairs | None:
        """The chunk's (query row, column among `sorted_candidates`, bonus) pairs; None
        without repeat scoring. Located once already when those are the scorer's own."""
        if state.pairs is None:
            return None
        if _same_ids(sorted_candidates, self.candidate_ids):
            return state.bonus
        return ColumnPairs.locate(sorted_candidates, state.pairs.row_U, state.pairs.target_U, state.pairs.bonus_U)

    def target_bonus(self, state: _QueryChunk, target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([Q] bonus of each query's pair with its target, 0 where none; [Q] bool: a pair)."""
        if state.pairs is None:
            return torch.zeros(len(target_ids)), torch.zeros(len(target_ids), dtype=torch.bool)
        return state.pairs.bonus_of(target_ids)


def _same_ids(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two ID tensors hold the same IDs: without reading them when they are views of
    one array (the evaluation's and the scorer's sorted candidates usually are: sorted_ids
    shares the caller's memory), which is asked once per query chunk."""
    if a.shape == b.shape and a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.dtype == b.dtype:
        return True
    return torch.equal(a, b)


def held_vector_bytes(num_candidates: int, dim: int, max_held_bytes: float, block_rows: int = VECTOR_BLOCK_ROWS) -> int:
    """What a rank's `CandidateVectors` holds (its table rows readable alone): every
    vector up to `max_held_bytes`, else two blocks."""
    every = num_candidates * dim * 4
    return every if every <= max_held_bytes else 2 * min(block_rows, num_candidates) * dim * 4


class CandidateVectors:
    """The unit vectors of a scorer's sorted candidates. Each is computed in its block
    (positions b * block_size onwards, one tower call a block), so a vector has the same
    bits however it is asked for: held or not, one at a time or a run.

    Held (computed once per evaluation) when they take at most `max_held_bytes`, or when
    this rank cannot read its table rows alone (target features, or a column-wise
    sharded table: their lookups are collective, every rank making as many calls).
    Otherwise a block is computed when asked, from this rank's own rows of the table
    (`local_table_rows`, no collective call), and the last two kept: the evaluation walks
    the candidates in order, so each block is computed about twice per query chunk (for
    the true targets, then for the count) while memory stays at two blocks, instead of
    the rank's whole share (1.28 GB for 5e6 rows x D 64)."""

    def __init__(
        self, model: TwoTowerRetrieval, candidate_ids: torch.Tensor, block_size: int, dist: Distributed,
        max_held_bytes: float,
    ) -> None:
        self.model, self.ids, self.block_size = model, candidate_ids, block_size
        self.dim = model.model_config.embedding_dim
        self.rows = None if model.has_features else local_table_rows(model, TARGET_TABLE)
        self._recent: dict[int, torch.Tensor] = {}
        self.held: torch.Tensor | None = None
        if self.rows is None or len(candidate_ids) * self.dim * 4 <= max_held_bytes:
            self.held = self._compute_all(dist)

    @property
    def held_bytes(self) -> int:
        """What this object holds at most: every vector, or two blocks."""
        if self.held is not None:
            return self.held.numel() * self.held.element_size()
        return 2 * min(self.block_size, len(self.ids)) * self.dim * 4

    def _num_blocks(self) -> int:
        return -(-len(self.ids) // self.block_size)

    @torch.no_grad()
    def _block(self, block: int) -> torch.Tensor:
        ids = self.ids[block * self.block_size : (block + 1) * self.block_size]
        if self.rows is None:
            return self.model.candidate_vectors(ids)
        return self.model.candidate_vectors_of_rows(self.rows.of(ids))

    def _compute_all(self, dist: Distributed) -> torch.Tensor:
        # Filled block by block in place: a list of blocks joined at the end would hold the
        # vectors twice at once. Collective lookups: every rank makes as many calls.
        held = torch.empty(len(self.ids), self.dim)  # evaluation runs in fp32
        num_blocks = self._num_blocks()
        if self.rows is None:
            num_blocks = int(dist.max(torch.tensor(num_blocks)))
        for block in range(num_blocks):
            held[block * self.block_size : (block + 1) * self.block_size] = self._block(block)
        return held

    def _cached_block(self, block: int) -> torch.Tensor:
        if block not in self._recent:
            if len(self._recent) >= 2:
                del self._recent[next(iter(self._recent))]  # the oldest
            self._recent[block] = self._block(block)
        return self._recent[block]

    def run(self, start: int, stop: int) -> torch.Tensor:
        """[stop - start, D] vectors of positions start..stop-1 (a view when held)."""
        if self.held is not None:
            return self.held[start:stop]
        first, last = start // self.block_size, (stop - 1) // self.block_size
        parts = []
        for block in range(first, last + 1):
            offset = block * self.block_size
            vectors = self._cached_block(block)
            parts.append(vectors[max(start - offset, 0) : stop - offset])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """[N, D] vectors of any positions."""
        if self.held is not None:
            return self.held[positions]
        out = torch.empty(len(positions), self.dim)
        blocks = positions // self.block_size
        for block in torch.unique(blocks).tolist():
            inside = blocks == block
            out[inside] = self._cached_block(block)[positions[inside] - block * self.block_size]
        return out
