"""Full-ranking evaluation: pessimistic ties, chunking, exclude-seen, metric formulas."""

from __future__ import annotations

import itertools
import threading
import warnings

import numpy as np
import pytest
import torch

from tests.trainer.smoke import smoke_trainer
from models.repeat import CONTACT_OFFSETS
from trainer.evaluation import (
    ColumnPairs, SeenTargets, full_ranking_ranks, full_ranking_ranks_at_bonus_shifts, metrics_from_ranks, sorted_ids,
)
from trainer.results import seen_targets
from trainer.build import model_scorer
from trainer.scoring import held_vector_bytes


class DotScorer:
    """Scores = query_vectors @ candidate_vectors.T (integer-valued: exact in float)."""

    def __init__(self, queries: torch.Tensor, items: torch.Tensor) -> None:
        self.queries, self.items = queries, items

    def query_state(self, rows: slice) -> torch.Tensor:
        return self.queries[rows]

    def score(self, q: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
        return q @ self.items[candidate_ids].T

    def score_pairs(self, q: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        return (q * self.items[target_ids]).sum(-1)


def _reference_ranks(scores: np.ndarray, true: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Unchunked, straight from the definition."""
    ranks = []
    for i, t in enumerate(true):
        s = scores[i]
        ranks.append(1 + sum(1 for c in candidates if c != t and s[c] >= s[t]))
    return np.array(ranks)


def test_constant_scorer_ranks_last_and_perfect_scorer_ranks_first():
    candidates = np.arange(50)
    true = np.array([3, 17, 49])
    constant = DotScorer(torch.ones(3, 1), torch.ones(50, 1))
    assert full_ranking_ranks(constant, true, candidates).tolist() == [50, 50, 50]
    items = torch.eye(50)
    perfect = DotScorer(items[true], items)
    assert full_ranking_ranks(perfect, true, candidates).tolist() == [1, 1, 1]


@pytest.mark.parametrize(("query_chunk", "candidate_chunk"), [(1, 1), (2, 7), (5, 64), (1000, 1000)])
def test_chunked_evaluation_equals_the_unchunked_reference(query_chunk, candidate_chunk):
    gen = torch.Generator().manual_seed(0)
    queries = torch.randint(-3, 4, (23, 4), generator=gen).double()
    items = torch.randint(-3, 4, (60, 4), generator=gen).double()  # many exact ties
    candidates = np.sort(np.random.default_rng(0).choice(60, size=41, replace=False))
    true = np.random.default_rng(1).choice(candidates, size=23)
    scorer = DotScorer(queries, items)
    ranks = full_ranking_ranks(scorer, true, candidates, query_chunk_size=query_chunk, candidate_chunk_size=candidate_chunk)
    expected = _reference_ranks((queries @ items.T).numpy(), true, candidates)
    np.testing.assert_array_equal(ranks, expected)


def test_exclude_seen_removes_past_targets_but_never_the_true_one():
    items = torch.arange(10, dtype=torch.float64)[:, None]  # item i scores i
    scorer = DotScorer(torch.ones(2, 1, dtype=torch.float64), items)
    true = np.array([5, 2])
    seen = SeenTargets(offsets=np.array([0, 3, 5]), targets=np.array([9, 8, 5, 2, 7]))
    candidates = np.arange(10)
    assert full_ranking_ranks(scorer, true, candidates).tolist() == [5, 8]
    excluded = full_ranking_ranks(scorer, true, candidates, seen=seen, candidate_chunk_size=3)
    assert excluded.tolist() == [3, 7]


def _identical_items(num_queries: int, num_items: int, dim: int = 64) -> DotScorer:
    """float32, random queries, every item the same random vector: every score is a tie."""
    gen = torch.Generator().manual_seed(0)
    return DotScorer(torch.randn(num_queries, dim, generator=gen), torch.randn(1, dim, generator=gen).expand(num_items, dim))


@pytest.mark.parametrize("num_candidates", [5, 16, 37, 64, 100])
def test_ties_stay_ties_at_every_chunk_width(num_candidates):
    # Within one product of width 5-7 or 9-11 this CPU rounds the tail columns differently:
    # chunk widths are rounded up to a multiple of 16 and the padding is not counted.
    scorer = _identical_items(40, num_candidates)
    true = np.arange(40) % num_candidates
    for chunk in range(1, 41):
        ranks = full_ranking_ranks(scorer, true, np.arange(num_candidates), candidate_chunk_size=chunk, query_chunk_size=13)
        assert ranks.tolist() == [num_candidates] * 40, chunk


def test_no_candidates_ranks_every_target_first():
    scorer = DotScorer(torch.ones(3, 1), torch.ones(5, 1))
    assert full_ranking_ranks(scorer, np.array([1, 2, 3]), np.array([], dtype=np.int64)).tolist() == [1, 1, 1]


class _ThreadRanks:
    """count_sum / score_max across ranks run as threads (what all_reduce does)."""

    def __init__(self, world_size: int) -> None:
        self.slots: list = [None] * world_size
        self.barrier = threading.Barrier(world_size)

    def reducer(self, rank: int, op):
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            dtypes = {t.dtype for t in self.slots}
            assert len(dtypes) == 1, f"ranks reduce different dtypes: {dtypes}"  # gloo / NCCL would not
            result = op(torch.stack(self.slots))
            self.barrier.wait()
            return result

        return reduce


@pytest.mark.parametrize("chunk", [8, 40])
@pytest.mark.parametrize("shares", [(5, 40), (0, 45), (23, 22)])
@pytest.mark.parametrize("items", ["identical", "integer"])
def test_ranks_over_candidate_shares_equal_the_single_process_ranks(shares, items, chunk):
    num_candidates = sum(shares)
    if items == "identical":
        scorer = _identical_items(30, num_candidates)
    else:
        gen = torch.Generator().manual_seed(1)
        scorer = DotScorer(torch.randint(-3, 4, (30, 3), generator=gen).float(),
                           torch.randint(-3, 4, (num_candidates, 3), generator=gen).float())
    true = np.random.default_rng(0).integers(0, num_candidates, size=30)
    expected = full_ranking_ranks(scorer, true, np.arange(num_candidates), candidate_chunk_size=chunk)
    ranks = _ThreadRanks(2)
    split = np.split(np.arange(num_candidates), [shares[0]])
    results: dict[int, np.ndarray] = {}

    def run(rank: int) -> None:
        results[rank] = full_ranking_ranks(
            scorer, true, split[rank], candidate_chunk_size=chunk, query_chunk_size=7,
            count_sum=ranks.reducer(rank, lambda t: t.sum(0)), score_max=ranks.reducer(rank, lambda t: t.max(0).values),
        )

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert set(results) == {0, 1}
    np.testing.assert_array_equal(results[0], expected)
    np.testing.assert_array_equal(results[1], expected)
    if items == "identical":
        assert expected.tolist() == [num_candidates] * 30


def test_metrics_follow_the_benchmark_formulas():
    ranks = np.array([1, 2, 10, 11, 60])
    m = metrics_from_ranks(ranks)
    assert m["hr@1"] == pytest.approx(0.2)
    assert m["hr@10"] == pytest.approx(0.6)
    assert m["hr@50"] == pytest.approx(0.8)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(11)) / 5)
    assert m["mrr"] == pytest.approx(np.mean(1 / ranks))
    assert m["mean_rank"] == pytest.approx(16.8)


def test_a_nan_true_score_ranks_last_never_first():
    items = torch.ones(6, 1)
    items[2] = float("nan")  # the true target's vector is broken
    scorer = DotScorer(torch.ones(1, 1), items)
    assert full_ranking_ranks(scorer, np.array([2]), np.arange(6)).tolist() == [6]


# ---------------------------------------------------------------- through the real model

def _smoke_trainer(*overrides: str):
    return smoke_trainer("eval.max_queries=200", *overrides)


@pytest.mark.parametrize("candidate_chunk", [1, 100, 1024, 1 << 20])
def test_a_model_giving_every_candidate_the_same_vector_ranks_last(monkeypatch, candidate_chunk):
    # The true score must be computed as the candidates' scores are (the same matrix
    # product): a multiply-and-sum differs from it in the last bits and ranked a share of
    # these queries first.
    trainer = _smoke_trainer("model.repeat_scoring=false", f"eval.candidate_chunk_size={candidate_chunk}")
    dim = trainer.config.model.embedding_dim
    gen = torch.Generator().manual_seed(0)
    vector = torch.nn.functional.normalize(torch.randn(dim, generator=gen), dim=0)
    # The candidate tower itself, which every way of computing candidate vectors goes through.
    monkeypatch.setattr(trainer.model.candidate_tower, "forward", lambda rows, features=None: vector.expand(len(rows), dim).clone())
    metrics = trainer.evaluate("test")
    assert metrics["mean_rank"] == len(trainer.prepared.stats.candidates)
    assert metrics["hr@50"] == 0.0


def test_the_models_ranks_do_not_depend_on_the_candidate_chunks():
    trainer = _smoke_trainer()  # the repeat re-scorer on: its bonus is added chunk by chunk
    prepared, config = trainer.prepared, trainer.config
    queries = prepared.split.queries(prepared.seqs, "test", config.eval.max_queries)
    scorer = model_scorer(trainer.model.eval(), config, prepared, queries, prepared.stats.candidates, "test")
    true = prepared.seqs.targets[queries.position]
    candidates = prepared.stats.candidates
    # One query chunk, one candidate chunk: the whole score matrix, ranked by the definition.
    state = scorer.query_state(slice(0, len(true)))
    scores = scorer.score(state, torch.from_numpy(np.sort(candidates))).numpy()
    column = {c: i for i, c in enumerate(np.sort(candidates))}
    expected = np.array([
        1 + int(np.sum(np.delete(scores[i], column[t]) >= scores[i, column[t]])) for i, t in enumerate(true)
    ])
    # Chunk sizes of a few columns are widened to 16 (a narrower product rounds otherwise).
    for chunk in (1, 7, 16, 37, 1000, 1024):
        ranks = full_ranking_ranks(scorer, true, candidates, query_chunk_size=len(true), candidate_chunk_size=chunk)
        np.testing.assert_array_equal(ranks, expected)


@pytest.mark.parametrize("block", [7, 100, 65536])
def test_candidate_vectors_computed_when_scored_rank_as_held_ones(block):
    """Past `max_held_bytes` a scorer holds two blocks of vectors and computes each when
    it is scored: the ranks (and every score) are those of the held vectors."""
    trainer = _smoke_trainer()
    prepared, config = trainer.prepared, trainer.config
    queries = prepared.split.queries(prepared.seqs, "test", config.eval.max_queries)
    candidates = prepared.stats.candidates
    true = prepared.seqs.targets[queries.position]

    def scorer(max_held_bytes):
        return model_scorer(
            trainer.model.eval(), config, prepared, queries, candidates, "test",
            vector_chunk_size=block, max_held_bytes=max_held_bytes,
        )

    held, computed = scorer(float("inf")), scorer(0)
    assert held.vectors.held is not None and computed.vectors.held is None
    assert computed.vectors.held_bytes < held.vectors.held_bytes or block >= len(candidates)
    # What bench/scale.py reports a rank holds is what the scorer holds, either way.
    dim = config.model.embedding_dim
    assert held.vectors.held_bytes == held_vector_bytes(len(candidates), dim, float("inf"), block)
    assert computed.vectors.held_bytes == held_vector_bytes(len(candidates), dim, 0, block)
    ids = torch.from_numpy(np.sort(candidates))
    # The rows read from the table are the rows a lookup returns.
    first = ids[:block]
    torch.testing.assert_close(held.vectors.run(0, len(first)), trainer.model.candidate_vectors(first), rtol=0, atol=0)
    state = held.query_state(slice(0, len(true)))
    torch.testing.assert_close(computed.score(state, ids), held.score(state, ids), rtol=0, atol=0)
    scattered = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))[:50]].sort().values
    torch.testing.assert_close(computed.score(state, scattered), held.score(state, scattered), rtol=0, atol=0)
    for chunk in (16, 1000):
        np.testing.assert_array_equal(
            full_ranking_ranks(computed, true, candidates, query_chunk_size=64, candidate_chunk_size=chunk),
            full_ranking_ranks(held, true, candidates, query_chunk_size=64, candidate_chunk_size=chunk),
        )


def test_a_target_that_is_no_candidate_is_ranked_among_the_candidates():
    items = torch.arange(10, dtype=torch.float64)[:, None]  # item i scores i
    scorer = DotScorer(torch.ones(2, 1, dtype=torch.float64), items)
    candidates = np.array([0, 2, 4, 6, 8])
    # 5 scores 5: beaten by 6 and 8; 8 is a candidate, so its own column doesn't count.
    ranks = full_ranking_ranks(scorer, np.array([5, 8]), candidates, candidate_chunk_size=2)
    assert ranks.tolist() == [3, 1]


def test_sorted_candidate_ids_share_memory_unless_they_need_sorting():
    ids = np.array([2, 5, 5, 9], dtype=np.int64)
    ids.flags.writeable = False  # as a prepared dataset's columns are
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shared = sorted_ids(ids)
    assert shared.tolist() == [2, 5, 5, 9] and np.shares_memory(shared.numpy(), ids)
    unsorted = np.array([9, 2, 5], dtype=np.int64)
    copied = sorted_ids(unsorted)
    assert copied.tolist() == [2, 5, 9] and not np.shares_memory(copied.numpy(), unsorted)
    assert unsorted.tolist() == [9, 2, 5]
    assert sorted_ids(np.array([3], dtype=np.int32)).dtype == torch.int64
    assert len(sorted_ids(np.zeros(0, dtype=np.int64))) == 0


@pytest.fixture(scope="module")
def trained_with_contacts():
    """A smoke model trained a few steps, so the contacts' bonuses set them apart."""
    trainer = _smoke_trainer()  # the contact offset on by default
    for batch in itertools.islice(iter(trainer.loader), 20):
        trainer.train_step(batch)
    trainer.model.eval()
    return trainer


@pytest.mark.parametrize("chunk", [16, 1024])
@pytest.mark.parametrize("exclude_seen", [False, True])
@pytest.mark.parametrize("candidate_share", ["all", "every other", "every other of the scorer's all"])
def test_one_pass_at_bonus_shifts_ranks_as_the_model_at_each_contact_offset(
    trained_with_contacts, chunk, exclude_seen, candidate_share
):
    """One score matrix, the contacts' bonuses shifted in the count: each shift's ranks are
    bitwise those of the model set to that offset, with several candidate chunks (the true
    scores from a chunk of their own, the last chunk overlapping) or one, past targets
    excluded or not, targets that are no candidate (scored by score_pairs, contacts among
    them), and a scorer holding more candidates than are ranked (its contacts located
    again among those ranked)."""
    trainer = trained_with_contacts
    model, prepared, config = trainer.model, trainer.prepared, trainer.config
    queries = prepared.split.queries(prepared.seqs, "valid", config.eval.max_queries)
    candidates = prepared.stats.candidates if candidate_share == "all" else prepared.stats.candidates[::2]
    scored = prepared.stats.candidates if candidate_share.endswith("all") else candidates
    true = prepared.seqs.targets[queries.position]
    options = {
        "query_chunk_size": 7, "candidate_chunk_size": chunk,
        "seen": seen_targets(prepared, queries) if exclude_seen else None,
    }
    try:
        model.set_contact_offset(0.0)
        scorer = model_scorer(model, config, prepared, queries, scored, "valid")
        if candidate_share != "all":  # some targets are no candidate, some of those contacts
            _, contact = scorer.target_bonus(scorer.query_state(slice(0, len(true))), torch.from_numpy(true))
            assert (contact.numpy() & ~np.isin(true, candidates)).any()
        shifted = full_ranking_ranks_at_bonus_shifts(scorer, true, candidates, CONTACT_OFFSETS, **options)
        for offset in CONTACT_OFFSETS:
            model.set_contact_offset(offset)
            at_offset = model_scorer(model, config, prepared, queries, scored, "valid")
            np.testing.assert_array_equal(
                shifted[offset], full_ranking_ranks(at_offset, true, candidates, **options), err_msg=f"offset {offset:+g}"
            )
    finally:
        model.set_contact_offset(0.0)
    assert len({shifted[offset].tobytes() for offset in CONTACT_OFFSETS}) == len(CONTACT_OFFSETS)


def test_a_nan_contact_bonus_ranks_its_target_last_at_every_shift():
    """A NaN true score counts as -inf in one pass too: every counted candidate, the
    contacts among them, ranks above it, as without the shift."""
    items = torch.arange(6, dtype=torch.float32)[:, None]  # item i scores i
    bonus = ColumnPairs(torch.tensor([0, 0]), torch.tensor([2, 4]), torch.tensor([float("nan"), 1.0]))

    class ContactScorer(DotScorer):
        def score(self, q, candidate_ids, with_bonus=True):
            scores = super().score(q, candidate_ids)
            if with_bonus:
                scores[bonus.rows, bonus.columns] += bonus.values
            return scores

        def score_pairs(self, q, target_ids, with_bonus=True):
            raise AssertionError("every target is a candidate")

        def contact_bonus(self, q, sorted_candidates):
            return bonus

        def target_bonus(self, q, target_ids):
            has = target_ids == 2
            return torch.where(has, torch.tensor(float("nan")), 0.0), has

    scorer = ContactScorer(torch.ones(1, 1), items)
    candidates, true = np.arange(6), np.array([2])
    assert full_ranking_ranks(scorer, true, candidates).tolist() == [6]  # the plain count: last
    shifted = full_ranking_ranks_at_bonus_shifts(scorer, true, candidates, (0.0, 1.0, -4.0))
    assert {shift: ranks.tolist() for shift, ranks in shifted.items()} == {0.0: [6], 1.0: [6], -4.0: [6]}
