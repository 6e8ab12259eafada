"""The recency-frequency baselines on tiny hand-made logs, and the two-way rule against a
brute-force reading of ../shared/BENCHMARK.md on random ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.baselines import IncomingEvents, RecencyFrequencyScorer, TwoWayRecencyFrequencyScorer, popularity_rank


def _two_way(events, released=None, counts=None, half_life=1.0, queries=None):
    """A scorer over `events` = [(actor, target, timestamp, row)] in one ID space of
    people 0..P-1. Queries: (actor, index of the event to predict in that actor's
    events), default every actor's last event. The flat layout is the event table's,
    sorted by (actor, timestamp, row)."""
    events = sorted(events, key=lambda e: (e[0], e[2], e[3]))
    actor, target, timestamp, row = (np.array(column, dtype=np.int64) for column in zip(*events))
    num_people = int(max(actor.max(), target.max())) + 1
    starts = {a: int(np.flatnonzero(actor == a)[0]) for a in np.unique(actor)}
    ends = {a: int(np.flatnonzero(actor == a)[-1]) + 1 for a in np.unique(actor)}
    if queries is None:
        queries = [(a, ends[a] - starts[a] - 1) for a in sorted(starts)]
    history_start = np.array([starts[a] for a, _ in queries], dtype=np.int64)
    position = np.array([starts[a] + i for a, i in queries], dtype=np.int64)
    released = np.ones(len(events), dtype=bool) if released is None else released(actor, target, timestamp, row)
    counts = np.zeros(num_people, dtype=np.int64) if counts is None else np.asarray(counts)
    return TwoWayRecencyFrequencyScorer(
        counts, actor, target, timestamp, row, _incoming(actor, target, timestamp, row, released),
        history_start, position, half_life,
    )


def _incoming(actor, target, timestamp, row, released) -> IncomingEvents:
    """The released events, in a scrambled order (the scorer sorts them)."""
    pick = np.flatnonzero(released)[::-1]
    return IncomingEvents(receivers=target[pick], senders=actor[pick], timestamps=timestamp[pick], rows=row[pick])


def _scores(scorer, num_people: int) -> torch.Tensor:
    """[Q, P] scores of every person as a candidate, every query of the scorer."""
    state = scorer.query_state(slice(0, len(scorer.position)))
    return scorer.score(state, torch.arange(num_people))


def _order(scores: torch.Tensor) -> list[int]:
    """Candidates best first (a stable sort: equal scores by ID)."""
    return torch.sort(scores, descending=True, stable=True).indices.tolist()


def test_an_incoming_only_contact_ranks_by_its_recency():
    # Person 0 writes to 1 (t=1) and 2 (t=2); person 3 writes to 0 at t=3, person 4 at t=0.
    # Query: person 0's event at t=9. Merged stream: 4(t0) 1(t1) 2(t2) 3(t3), ages 3 2 1 0.
    events = [(0, 1, 1, 1), (0, 2, 2, 2), (3, 0, 3, 3), (4, 0, 0, 4), (0, 5, 9, 5)]
    scores = _scores(_two_way(events, queries=[(0, 2)]), 6)[0]
    assert _order(scores)[:4] == [3, 2, 1, 4]
    assert scores[4] > scores[5]  # read, however old, above every contact never seen
    # The actor's own recency-frequency cannot see 3 or 4.
    own = RecencyFrequencyScorer(np.zeros(6, dtype=np.int64), np.array([1, 2, 5]), np.array([0]), np.array([2]), 1.0)
    own_scores = own.score(own.query_state(slice(0, 1)), torch.arange(6))[0]
    assert own_scores[3] == own_scores[4] == own_scores[5]


def test_events_not_yet_released_are_never_read():
    # Person 0's query at t=10 (its event to 6). Read: 3 -> 0 at t=4. Not read: 4 -> 0 at
    # t=5, held out by the split; 5 -> 0 at t=10, not strictly before the query; 1 -> 0
    # at t=11, after it (released or not).
    events = [(0, 2, 1, 1), (3, 0, 4, 2), (4, 0, 5, 3), (5, 0, 10, 4), (1, 0, 11, 5), (0, 6, 10, 6)]
    held_out = lambda actor, target, timestamp, row: row != 3  # noqa: E731  (4 -> 0 not released)
    scorer = _two_way(events, released=held_out, queries=[(0, 1)])
    scores = _scores(scorer, 7)[0]
    assert _order(scores)[:2] == [3, 2]
    unseen = scores[0]
    assert scores[4] == scores[5] == scores[1] == scores[6] == unseen
    # Released, 4 -> 0 (t=5) is read and is then the newest.
    assert _order(_scores(_two_way(events, queries=[(0, 1)]), 7)[0])[:3] == [4, 3, 2]


def test_ties_are_broken_by_popularity():
    # h = inf: a plain count. Contacts 1 and 2 each once (1 own, 2 incoming), 3 twice.
    events = [(0, 1, 1, 1), (2, 0, 2, 2), (0, 3, 3, 3), (3, 0, 4, 4), (0, 4, 9, 5)]
    counts = [0, 1, 9, 0, 3, 5]  # 2 above 1 in popularity; 5 the most popular unseen
    scorer = _two_way(events, counts=counts, half_life=float("inf"), queries=[(0, 2)])
    assert _order(_scores(scorer, 6)[0]) == [3, 2, 1, 5, 4, 0]


def test_equal_timestamps_merge_in_file_row_order():
    # At t=5 person 0 writes to 1 (row 2) and person 2 writes to 0 (row 1): the row, not the
    # direction, says which is newer.
    events = [(0, 1, 5, 2), (2, 0, 5, 1), (0, 3, 9, 3)]
    assert _order(_scores(_two_way(events, queries=[(0, 1)]), 4)[0])[:2] == [1, 2]
    events = [(0, 1, 5, 1), (2, 0, 5, 2), (0, 3, 9, 3)]
    assert _order(_scores(_two_way(events, queries=[(0, 1)]), 4)[0])[:2] == [2, 1]


def test_a_self_message_is_read_once():
    # 0 -> 0 once, 0 -> 1 twice (older): with h = inf, 1 (count 2) above 0 (count 1, not 2).
    events = [(0, 1, 1, 1), (0, 1, 2, 2), (0, 0, 3, 3), (0, 2, 9, 4)]
    scores = _scores(_two_way(events, half_life=float("inf"), queries=[(0, 3)]), 3)[0]
    assert _order(scores)[:2] == [1, 0]


def _brute_force_keys(events, released, history_start, position, half_life, counts):
    """{(query, candidate): (decayed count, popularity)} as BENCHMARK.md words the rule."""
    actor, target, timestamp, row = events
    keys = {}
    for q, (start, stop) in enumerate(zip(history_start, position)):
        a, now = actor[stop], timestamp[stop]
        stream = [(timestamp[i], row[i], target[i]) for i in range(start, stop)]
        stream += [
            (timestamp[i], row[i], actor[i])
            for i in range(len(actor))
            if released[i] and target[i] == a and actor[i] != a and timestamp[i] < now
        ]
        stream.sort()
        rf = np.zeros(len(counts))
        for age, (_, _, contact) in enumerate(reversed(stream)):
            rf[contact] += 0.5 ** (age / half_life)
        for c in range(len(counts)):
            keys[q, c] = (float(rf[c]), int(counts[c]))
    return keys


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("half_life", [1.0, float("inf")])
def test_two_way_orders_candidates_as_the_protocol_words_it(seed, half_life):
    """Random messaging logs with many equal timestamps and shuffled file rows; every pair of
    candidates compares as (decayed count, popularity) does, ties as ties."""
    rng = np.random.default_rng(seed)
    num_people, num_events = 8, 150
    actor, target = rng.integers(0, num_people, num_events), rng.integers(0, num_people, num_events)
    timestamp, row = rng.integers(0, 30, num_events), rng.permutation(num_events) + 1
    order = np.lexsort((row, timestamp, actor))
    actor, target, timestamp, row = actor[order], target[order], timestamp[order], row[order]
    released = rng.random(num_events) < 0.7
    counts = rng.integers(0, 4, num_people)
    starts = np.flatnonzero(np.r_[True, actor[1:] != actor[:-1]])
    ends = np.r_[starts[1:], num_events]
    position = np.maximum(ends - 1 - rng.integers(0, 3, len(starts)), starts)
    scorer = TwoWayRecencyFrequencyScorer(
        counts, actor, target, timestamp, row, _incoming(actor, target, timestamp, row, released), starts, position,
        half_life,
    )
    # Two query chunks: a chunk's state holds only its own queries.
    halves = [slice(0, len(starts) // 2), slice(len(starts) // 2, len(starts))]
    scores = torch.cat([scorer.score(scorer.query_state(s), torch.arange(num_people)) for s in halves])
    true_targets = torch.from_numpy(target[position])
    pairs = torch.cat([scorer.score_pairs(scorer.query_state(s), true_targets[s]) for s in halves])
    torch.testing.assert_close(pairs, scores[torch.arange(len(starts)), true_targets])
    keys = _brute_force_keys((actor, target, timestamp, row), released, starts, position, half_life, counts)
    for q in range(len(starts)):
        for c in range(num_people):
            for d in range(num_people):
                expected = (keys[q, c] > keys[q, d]) - (keys[q, c] < keys[q, d])
                got = int(torch.sign(scores[q, c] - scores[q, d]))
                assert got == expected, (q, c, d)


@pytest.mark.parametrize("highest", [0, 7, 10_000, 10**12])  # the last: wider than the count table, sorted
@pytest.mark.parametrize("num_targets", [1, 50, 3_000])
def test_popularity_rank_is_the_dense_rank_of_the_counts(highest, num_targets):
    rng = np.random.default_rng(num_targets + highest)
    counts = rng.integers(0, highest + 1, size=num_targets, dtype=np.int64)
    _, dense = np.unique(counts, return_inverse=True)  # the definition
    ranks = popularity_rank(counts)
    assert ranks.dtype == np.int32
    assert np.array_equal(ranks, dense)
    assert len(popularity_rank(counts[:0])) == 0
    with pytest.raises(ValueError, match="counts must be >= 0"):
        popularity_rank(np.array([3, -1]))
    with pytest.raises(TypeError, match="integer counts"):
        popularity_rank(np.array([True, False]))
