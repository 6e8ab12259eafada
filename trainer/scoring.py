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

from dataclasses import dataclass

import numpy as np
import torch

from data.batches import BatchBuilder
from data.incoming import Incoming
from data.sequences import Queries, Sequences
from trainer.distributed import Distributed
from trainer.evaluation import ColumnPairs
from models.retrieval import QueryEncoding, TwoTowerRetrieval


@dataclass
class _QueryChunk:
    encoding: QueryEncoding
    bonus: ColumnPairs | None
    """The repeat bonus of each (query, history target) pair, located in the candidates."""
    query_over_tau_BD: torch.Tensor
    """Query vectors / tau: the [Q, D] side scaled once, not every [Q, C] chunk of scores."""


class ModelScorer:
    def __init__(
        self,
        model: TwoTowerRetrieval,
        seqs: Sequences,
        queries: Queries,
        max_len: int,
        candidate_ids: np.ndarray,
        *,
        vector_chunk_size: int = 65536,
        incoming: Incoming | None = None,
        incoming_window: int = 0,
        dist: Distributed = Distributed(),
    ) -> None:
        """`candidate_ids`: the candidates this scorer scores (on several ranks, the ones
        this rank owns); their vectors are computed once, `vector_chunk_size` per table
        lookup (a collective call on several ranks, so few and large). `incoming`: the
        incoming events the queries may read (their last `incoming_window` before each
        query's time go to the repeat re-scorer)."""
        self.model = model
        self.temperature = model.loss_config.temperature
        self.builder = BatchBuilder(
            seqs, queries, max_len, active_pool=np.zeros(1, dtype=np.int64),
            incoming=incoming, incoming_window=incoming_window,
        )
        self.candidate_ids = torch.from_numpy(np.sort(np.asarray(candidate_ids, dtype=np.int64)))
        # Table lookups are collective on several ranks: every rank makes as many calls.
        chunk_size = vector_chunk_size
        num_chunks = -(-len(self.candidate_ids) // chunk_size)
        num_chunks = int(dist.max(torch.tensor(num_chunks)))
        with torch.no_grad():
            vectors = [
                model.candidate_vectors(self.candidate_ids[i * chunk_size : (i + 1) * chunk_size])
                for i in range(num_chunks)
            ]
        dim = model.model_config.embedding_dim
        self.candidate_vectors = torch.cat(vectors) if vectors else torch.zeros(0, dim)

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
        batch = self.builder.build(np.arange(rows.start, rows.stop))
        encoding = self.model.encode_queries(
            batch.query_values("actor"),
            batch.query_values("next_action"),
            batch.history,
            batch.query_values("next_timestamp"),
            batch.incoming,
        )
        bonus = None
        if encoding.history is not None:
            items = encoding.history
            bonus = ColumnPairs.locate(self.candidate_ids, items.row_U, items.target_U, encoding.bonus_U)
        return _QueryChunk(encoding, bonus, encoding.query_BD / self.temperature)

    @torch.no_grad()
    def score(self, state: _QueryChunk, candidate_ids: torch.Tensor) -> torch.Tensor:
        start = self._run_start(candidate_ids)
        # A contiguous run: a view of the vectors and the bonus pairs found by two binary
        # searches; otherwise (any other candidate list) looked up one by one.
        if start is not None:
            vectors = self.candidate_vectors[start : start + len(candidate_ids)]
        else:
            vectors = self.candidate_vectors[torch.searchsorted(self.candidate_ids, candidate_ids)]
        scores_QC = state.query_over_tau_BD @ vectors.T
        if state.bonus is None:
            return scores_QC
        if start is not None:
            rows, columns, bonus = state.bonus.in_range(start, start + len(candidate_ids))
        else:
            items = state.encoding.history
            located = ColumnPairs.locate(candidate_ids, items.row_U, items.target_U, state.encoding.bonus_U)
            rows, columns, bonus = located.rows, located.columns, located.values
        # In place: scores_QC is this call's own matmul output (a copy would be one more [Q, C] pass).
        return scores_QC.index_put_((rows, columns), bonus, accumulate=True)

    @torch.no_grad()
    def score_pairs(self, state: _QueryChunk, target_ids: torch.Tensor) -> torch.Tensor:
        encoding = state.encoding
        # Only for true targets that are no candidate (the evaluation reads the others from
        # its score chunks); looked up collectively, as such a target is held by no rank.
        scores_Q = (state.query_over_tau_BD * self.model.candidate_vectors(target_ids)).sum(-1)
        if encoding.history is not None:
            index, found = encoding.history.find(torch.arange(len(target_ids)), target_ids)
            scores_Q = scores_Q + torch.where(found, encoding.bonus_U[index], 0.0)
        return scores_Q
