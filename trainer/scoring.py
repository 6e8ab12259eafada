"""The trained model as a `RankingScorer` for exact full-ranking evaluation.

score(x, c) = cos(q(x), c) / tau + bonus(x, c)   (bonus: repeat re-scoring, 0 off-history)

Candidate vectors are computed once per evaluation, in chunks; query vectors once per
query chunk. On several ranks each rank holds and scores the candidates whose table
rows it owns (trainer/distributed.py `owned_candidates`), and the per-query counts are
summed across ranks: no rank holds every candidate vector.

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
from models.retrieval import QueryEncoding, TwoTowerRetrieval


@dataclass
class _QueryChunk:
    encoding: QueryEncoding


class ModelScorer:
    def __init__(
        self,
        model: TwoTowerRetrieval,
        seqs: Sequences,
        queries: Queries,
        max_len: int,
        candidate_ids: np.ndarray,
        *,
        chunk_size: int = 65536,
        incoming: Incoming | None = None,
        incoming_window: int = 0,
        dist: Distributed = Distributed(),
    ) -> None:
        """`candidate_ids`: the candidates this scorer scores (on several ranks, the ones
        this rank owns); their vectors are computed once, in chunks. `incoming`: the
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
        num_chunks = -(-len(self.candidate_ids) // chunk_size)
        num_chunks = int(dist.max(torch.tensor(num_chunks)))
        with torch.no_grad():
            vectors = [
                model.candidate_vectors(self.candidate_ids[i * chunk_size : (i + 1) * chunk_size])
                for i in range(num_chunks)
            ]
        dim = model.model_config.embedding_dim
        self.candidate_vectors = torch.cat(vectors) if vectors else torch.zeros(0, dim)

    def _vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Vectors of candidates this scorer holds. The evaluation walks the scorer's own
        sorted candidates chunk by chunk, so a chunk is usually a contiguous run of them:
        then a view, not a copy of [C, D] (measured: the copy cost more than the check)."""
        if len(ids) == 0:
            return self.candidate_vectors[:0]
        start = int(torch.searchsorted(self.candidate_ids, ids[:1]))
        run = self.candidate_ids[start : start + len(ids)]
        if len(run) == len(ids) and torch.equal(run, ids):
            return self.candidate_vectors[start : start + len(ids)]
        return self.candidate_vectors[torch.searchsorted(self.candidate_ids, ids)]

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
        return _QueryChunk(encoding)

    def _add_bonus(self, scores_QC: torch.Tensor, encoding: QueryEncoding, candidate_ids: torch.Tensor) -> torch.Tensor:
        if encoding.history is None:
            return scores_QC
        items = encoding.history
        column = torch.searchsorted(candidate_ids, items.target_U).clamp(max=len(candidate_ids) - 1)
        hit = candidate_ids[column] == items.target_U
        # In place: scores_QC is this call's own matmul output (a copy would be one more [Q, C] pass).
        return scores_QC.index_put_((items.row_U[hit], column[hit]), encoding.bonus_U[hit], accumulate=True)

    @torch.no_grad()
    def score(self, state: _QueryChunk, candidate_ids: torch.Tensor) -> torch.Tensor:
        # Scale the [Q, D] queries, not the [Q, C] scores: one pass less over the chunk.
        scores_QC = (state.encoding.query_BD / self.temperature) @ self._vectors(candidate_ids).T
        return self._add_bonus(scores_QC, state.encoding, candidate_ids)

    @torch.no_grad()
    def score_pairs(self, state: _QueryChunk, target_ids: torch.Tensor) -> torch.Tensor:
        encoding = state.encoding
        # The true targets may live on any rank: looked up (collectively), not held.
        scores_Q = ((encoding.query_BD / self.temperature) * self.model.candidate_vectors(target_ids)).sum(-1)
        if encoding.history is not None:
            index, found = encoding.history.find(torch.arange(len(target_ids)), target_ids)
            scores_Q = scores_Q + torch.where(found, encoding.bonus_U[index], 0.0)
        return scores_Q
