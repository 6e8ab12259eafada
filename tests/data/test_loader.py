"""The rank-aware loader: disjoint shares, determinism, exact resume, workers."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from data.batches import BatchBuilder, BatchSpec
from data.loader import Share, TrainLoader, _shuffled
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
    return BatchBuilder(seqs, queries, BatchSpec(4, num_rand_negs), active_pool=np.arange(n))


def _take(loader: TrainLoader, steps: int) -> list:
    return [(b.target.tolist(), b.random_negatives.tolist()) for b in itertools.islice(iter(loader), steps)]


def _shares(sizes: list[int]) -> list[Share]:
    """Consecutive example ranges of these sizes, one share a rank."""
    bounds = np.r_[0, np.cumsum(sizes)]
    return [Share(rank, np.arange(bounds[rank], bounds[rank + 1])) for rank in range(len(sizes))]


def test_each_rank_draws_only_from_its_share_and_every_rank_runs_the_same_steps():
    builder, shares = _builder(), _shares([23, 17])  # uneven: 17 // 5 = 3 steps for both
    per_rank = [_take(TrainLoader(builder, batch_size=5, seed=3, shares=[s], epoch_examples=17), 3 * 4) for s in shares]
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
    per_rank = [_take(TrainLoader(builder, batch_size=5, seed=3, shares=[s], epoch_examples=17), 6) for s in shares]
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
    assert state == {"epoch": 1, "examples": 16, "num_shares": 1, "epoch_examples": 40, "remainder": 0}
    resumed = TrainLoader(builder, batch_size=8, seed=0)
    resumed.load_state_dict(state)
    assert head + _take(resumed, 5) == uninterrupted


def _targets(batches: list) -> list[int]:
    return [t for targets, _ in batches for t in targets]


def test_resumed_with_another_batch_size_the_run_goes_on_at_the_next_unseen_example():
    builder = _builder()
    epoch = _targets(_take(TrainLoader(builder, batch_size=1, seed=0), 40))  # the epoch's order
    loader = TrainLoader(builder, batch_size=8, seed=0)
    head = _targets(_take(loader, 2))
    for batch_size in (3, 5, 16):
        resumed = TrainLoader(builder, batch_size=batch_size, seed=0)
        resumed.load_state_dict(loader.state_dict())
        rest = _targets(_take(resumed, (40 - 16) // batch_size))
        # The same order, from example 16 on, in batches of the new size; nothing repeated.
        assert head + rest == epoch[: len(head) + len(rest)]
        assert resumed.examples == 16 + len(rest)
        # No full batch left: a checkpoint now names the next epoch, from its start.
        assert (resumed.state_dict()["epoch"], resumed.state_dict()["examples"]) == (1, 0)
        # Then the next epoch, from its start.
        fresh = _take(TrainLoader(builder, batch_size=batch_size, seed=0), 40 // batch_size + 1)
        assert _take(resumed, 1) == fresh[-1:]


def _partitions(rows: np.ndarray) -> np.ndarray:
    """Example i lies in partition i % 4: partitions interleave in row order, as hashed actors do."""
    return rows % 4


def _partitioned_shares(parts_of_share: list[list[int]], n: int = 40) -> list[Share]:
    rows = np.arange(n)
    return [Share(i, rows[np.isin(_partitions(rows), parts)]) for i, parts in enumerate(parts_of_share)]


def _layout(builder, parts_of_share: list[list[int]], batch_size: int, **kwargs) -> TrainLoader:
    """One process holding every share of a layout, as N ranks would hold them."""
    return TrainLoader(builder, batch_size=batch_size, seed=0, shares=_partitioned_shares(parts_of_share),
                       partition_of_rows=_partitions, **kwargs)


def _drawn_rows(bits: dict[int, np.ndarray], n: int = 40) -> set[int]:
    rows = np.arange(n)
    drawn = set()
    for part, packed in bits.items():
        in_part = rows[_partitions(rows) == part]
        drawn |= set(in_part[np.unpackbits(packed, count=len(in_part)).astype(bool)].tolist())
    return drawn


def test_resumed_on_other_rank_counts_mid_epoch_the_run_draws_exactly_the_examples_not_drawn_yet():
    builder = _builder()  # example i's target is i + 1
    two = _layout(builder, [[0, 2], [1, 3]], batch_size=3)  # 2 ranks: 20 examples each
    head = _targets(_take(two, 2))  # 6 of each share
    drawn = two.drawn()
    assert sorted(drawn) == [0, 1, 2, 3] and _drawn_rows(drawn) == {t - 1 for t in head}
    # On 1 rank (one share of everything): the 28 examples left, once each, shuffled afresh.
    one = _layout(builder, [[0, 1, 2, 3]], batch_size=4)
    one.load_state_dict(two.state_dict(), drawn)
    assert one.in_remainder and one.epoch == 0
    rest = _targets(_take(one, 7))
    assert sorted(head + rest) == list(range(1, 41))
    # Then whole epochs, as a 1-rank run draws them.
    assert _take(one, 10) == _take(_layout(builder, [[0, 1, 2, 3]], batch_size=4), 20)[10:]
    assert one.epoch == 1 and not one.in_remainder


def test_a_resume_inside_a_remainder_epoch_still_draws_each_example_once():
    builder = _builder()
    one = _layout(builder, [[0, 1, 2, 3]], batch_size=2)
    first = _targets(_take(one, 5))  # 10 of 40
    four = _layout(builder, [[0], [1], [2], [3]], batch_size=2, epoch_examples=10)  # 4 ranks of 10
    four.load_state_dict(one.state_dict(), one.drawn())
    # Each share has 10 less what the 1-rank run drew of it left; the fewest sets the steps.
    left = [10 - sum(1 for t in first if (t - 1) % 4 == part) for part in range(4)]
    assert four._remainder_examples == min(left)
    second = _targets(_take(four, 1))  # one step: 2 of each share
    assert four.state_dict()["remainder"] == 1
    two = _layout(builder, [[0, 3], [1, 2]], batch_size=1, epoch_examples=20)
    two.load_state_dict(four.state_dict(), four.drawn())
    third = _targets(_take(two, two._remainder_examples))
    drawn = first + second + third
    assert len(drawn) == len(set(drawn))  # never twice in the epoch
    # What sits out: only the larger share's surplus over the share with the fewest left.
    undrawn_per_share = [sum(1 for t in set(range(1, 41)) - set(drawn) if (t - 1) % 4 in parts) for parts in ([0, 3], [1, 2])]
    assert min(undrawn_per_share) == 0
    _take(two, 1)
    assert two.epoch == 1 and not two.in_remainder


def test_a_checkpoint_at_an_epochs_end_resumes_on_other_ranks_at_the_next_epochs_start():
    builder = _builder()
    two = _layout(builder, [[0, 2], [1, 3]], batch_size=3)  # 6 steps of 3 from each share of 20
    _take(two, 6)  # the epoch's last step: 2 examples of each share sit out
    state, drawn = two.state_dict(), two.drawn()
    assert (state["epoch"], state["examples"], state["remainder"]) == (1, 0, 0)
    assert _drawn_rows(drawn) == set()
    one = _layout(builder, [[0, 1, 2, 3]], batch_size=4)
    assert not one.needs_drawn(state)
    one.load_state_dict(state, drawn)
    assert (one.epoch, one.examples, one.in_remainder) == (1, 0, False)


def test_a_remainder_draws_its_own_random_negatives():
    builder = _builder()
    one = _layout(builder, [[0, 1, 2, 3]], batch_size=4)
    _take(one, 2)
    two = _layout(builder, [[0, 2], [1, 3]], batch_size=2, epoch_examples=20)
    two.load_state_dict(one.state_dict(), one.drawn())
    whole = _layout(builder, [[0, 2], [1, 3]], batch_size=2, epoch_examples=20)
    remainder_negatives = [negatives for _, negatives in _take(two, 3)]
    whole_negatives = [negatives for _, negatives in _take(whole, 3)]
    assert remainder_negatives != whole_negatives  # not a whole epoch's steps' streams


def test_drawn_examples_that_do_not_fit_this_data_are_refused():
    import pytest

    builder = _builder()
    two = _layout(builder, [[0, 2], [1, 3]], batch_size=3)
    _take(two, 1)
    one = _layout(builder, [[0, 1, 2, 3]], batch_size=4)
    with pytest.raises(ValueError, match="lack partition 3"):
        one.load_state_dict(two.state_dict(), {p: b for p, b in two.drawn().items() if p != 3})
    with pytest.raises(ValueError, match="partition 1 cover 8 bits, but it holds 10 examples here"):
        one.load_state_dict(two.state_dict(), {**two.drawn(), 1: np.zeros(1, np.uint8)})
    # A rank whose bits fit still refuses when another's did not: none waits in the collective.
    with pytest.raises(ValueError, match="another rank refused"):
        _layout(builder, [[0, 1, 2, 3]], batch_size=4, least_over_ranks=lambda n: min(n, -1)).load_state_dict(
            two.state_dict(), two.drawn())
    with pytest.raises(ValueError, match="a remainder epoch's position without the examples it has drawn"):
        one.load_state_dict({**two.state_dict(), "remainder": 1})
    with pytest.raises(ValueError, match="rows must be ascending"):
        TrainLoader(builder, batch_size=2, seed=0, shares=[Share(0, np.array([3, 1, 2]))])


def test_resumed_on_other_shares_without_the_drawn_examples_goes_on_from_the_same_fraction_and_says_so(caplog):
    builder = _builder()
    two = [TrainLoader(builder, batch_size=4, seed=0, shares=[s], epoch_examples=20, num_shares=2)
           for s in _shares([20, 20])]
    for loader in two:
        _take(loader, 2)  # 8 of each share's 20 examples: 40% of the epoch
    one = TrainLoader(builder, batch_size=4, seed=0)
    assert one.needs_drawn(two[0].state_dict())
    with caplog.at_level("WARNING", logger="data.loader"):
        one.load_state_dict(two[0].state_dict())  # a checkpoint written before the bits were
    assert one.state_dict()["examples"] == 16 and one.epoch == 0  # 40% of 40
    assert "40.0% into epoch 0 on 1 shares" in caplog.text


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


def test_an_epoch_order_is_the_permutation_of_its_rows_without_holding_it():
    # The order every logged run drew (rows[permutation]), from a shuffled copy of the rows.
    rows = np.flatnonzero(np.random.default_rng(5).random(5000) < 0.7)
    order = _shuffled(rows, np.random.default_rng([0, 3]))
    assert np.array_equal(order, rows[np.random.default_rng([0, 3]).permutation(len(rows))])
    assert order.dtype == np.int32 and rows.dtype == np.int64  # held at half the width; rows untouched
    assert np.array_equal(rows, np.flatnonzero(np.random.default_rng(5).random(5000) < 0.7))
    # Indices past int32 keep their width, and the same order.
    wide = rows + 2**31
    assert np.array_equal(_shuffled(wide, np.random.default_rng(1)), wide[np.random.default_rng(1).permutation(len(wide))])
    assert _shuffled(wide, np.random.default_rng(1)).dtype == np.int64
    assert len(_shuffled(np.zeros(0, dtype=np.int64), np.random.default_rng(1))) == 0
