"""The rank-aware loader: disjoint shares, determinism, exact resume, workers."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from data.batches import BatchBuilder
from data.loader import Share, TrainLoader
from data.sequences import Queries, Sequences


def _builder(num_examples: int = 40, num_rand_negs: int = 2) -> BatchBuilder:
    n = num_examples + 1
    seqs = Sequences(
        actor=np.array([0]),
        offsets=np.array([0, n]),
        targets=np.arange(n),
        actions=np.zeros(n, dtype=np.int32),
        timestamps=np.arange(n),
        num_targets=n,
        num_actors=1,
        num_actions=1,
    )
    queries = Queries(sequence=np.zeros(num_examples, np.int64), position=np.arange(1, n), history_start=np.zeros(num_examples, np.int64))
    return BatchBuilder(seqs, queries, max_len=4, active_pool=np.arange(n), num_rand_negs=num_rand_negs)


def _take(loader: TrainLoader, steps: int) -> list:
    return [(b.target.tolist(), b.random_negatives.tolist()) for b in itertools.islice(iter(loader), steps)]


def _shares(sizes: list[int]) -> list[Share]:
    """Consecutive example ranges of these sizes, one share a rank."""
    bounds = np.r_[0, np.cumsum(sizes)]
    return [Share(rank, np.arange(bounds[rank], bounds[rank + 1])) for rank in range(len(sizes))]


def test_each_rank_draws_only_from_its_share_and_every_rank_runs_the_same_steps():
    builder, shares = _builder(), _shares([23, 17])  # uneven: 17 // 5 = 3 steps for both
    per_rank = [_take(TrainLoader(builder, batch_size=5, seed=3, shares=[s], steps_per_epoch=3), 3 * 4) for s in shares]
    for share, batches in zip(shares, per_rank):
        for epoch in range(4):
            targets = [t for step in batches[epoch * 3 : epoch * 3 + 3] for t in step[0]]
            assert len(targets) == len(set(targets)) == 15  # no example twice in an epoch
            assert set(targets) <= set((share.rows + 1).tolist())  # target of example i is i + 1
    # The larger share sits out a different 8 of its 23 examples each epoch, none always.
    left_out = [set(range(1, 24)) - {t for step in per_rank[0][e * 3 : e * 3 + 3] for t in step[0]} for e in range(4)]
    assert len({frozenset(s) for s in left_out}) == 4 and not set.intersection(*left_out)


def test_one_process_holding_every_share_builds_the_concatenated_global_batches():
    builder, shares = _builder(), _shares([23, 17])
    per_rank = [_take(TrainLoader(builder, batch_size=5, seed=3, shares=[s], steps_per_epoch=3), 6) for s in shares]
    together = _take(TrainLoader(builder, batch_size=5, seed=3, shares=shares), 6)
    for step in range(6):
        assert together[step][0] == per_rank[0][step][0] + per_rank[1][step][0]
        assert together[step][1] == per_rank[0][step][1] + per_rank[1][step][1]  # random negatives too


def test_same_seed_same_batches_and_epochs_reshuffle():
    builder = _builder()
    first = _take(TrainLoader(builder, batch_size=8, seed=1), 10)
    again = _take(TrainLoader(builder, batch_size=8, seed=1), 10)
    assert first == again
    assert first[:5] != first[5:]  # epoch 1 is a new permutation
    assert _take(TrainLoader(builder, batch_size=8, seed=2), 5) != first[:5]


def test_restored_position_continues_exactly():
    builder = _builder()
    uninterrupted = _take(TrainLoader(builder, batch_size=8, seed=0), 12)
    loader = TrainLoader(builder, batch_size=8, seed=0)
    head = _take(loader, 7)
    state = loader.state_dict()
    assert state == {"epoch": 1, "step": 2}
    resumed = TrainLoader(builder, batch_size=8, seed=0)
    resumed.load_state_dict(state)
    assert head + _take(resumed, 5) == uninterrupted


def test_workers_build_the_same_batches():
    builder = _builder()
    in_process = _take(TrainLoader(builder, batch_size=8, seed=0), 6)
    with_workers = _take(TrainLoader(builder, batch_size=8, seed=0, num_workers=2), 6)
    assert in_process == with_workers


def test_too_few_examples_for_one_batch_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="cannot fill one batch"):
        TrainLoader(_builder(4), batch_size=8, seed=0)
    assert torch.tensor(1)  # keep torch imported for the workers test above
