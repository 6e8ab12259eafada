"""Sequences and the leave-last-out split on small hand-made logs."""

from __future__ import annotations

import numpy as np

from data.events import load_events
from data.sequences import Sequences, Split, TargetStats
from tests.conftest import data_config

# actor 1: 1 event; actor 2: 2 events; actor 3: 3 events with a time tie (rows 4 and 5
# share t=10, so file order decides); actor 4: 4 events given out of time order.
LOG = """1 9 5
2 9 1
2 8 2
3 7 10
3 6 10
3 5 11
4 1 40
4 2 30
4 3 20
4 5 10
"""


def _prepare(write, **overrides):
    config = data_config(write("g.txt", LOG), **overrides)
    seqs = Sequences.from_event_log(load_events(config))
    return config, seqs, Split.leave_last_out(seqs)


def _raw(seqs, ids, flat):
    return ids.to_raw(seqs.targets[flat])


def test_sequences_are_jagged_and_sorted_by_time_then_row(write):
    config, seqs, _ = _prepare(write)
    ids = load_events(config).target_ids
    assert seqs.lengths.tolist() == [1, 2, 3, 4]
    assert seqs.offsets.tolist() == [0, 1, 3, 6, 10]
    assert _raw(seqs, ids, np.arange(3, 6)) == [7, 6, 5]  # time tie kept in file order
    assert _raw(seqs, ids, np.arange(6, 10)) == [5, 3, 2, 1]  # sorted by time


def test_only_actors_with_three_or_more_events_are_evaluated(write):
    config, seqs, split = _prepare(write)
    ids = load_events(config).target_ids
    assert split.evaluated.tolist() == [2, 3]
    test, valid = split.queries(seqs, "test"), split.queries(seqs, "valid")
    assert _raw(seqs, ids, test.position) == [5, 1]
    assert _raw(seqs, ids, valid.position) == [6, 2]
    # test history includes the validation event; validation history stops before it
    assert (test.position - test.history_start).tolist() == [2, 3]
    assert (valid.position - valid.history_start).tolist() == [1, 2]


def test_training_events_exclude_validation_and_test_events(write):
    _, seqs, split = _prepare(write)
    mask = split.train_mask(seqs)
    assert mask.tolist() == [True, True, True, True, False, False, True, True, False, False]
    known_test = split.known_mask(seqs, "test")
    assert known_test.tolist() == [True, True, True, True, True, False, True, True, True, False]
    # split sizes add up: every event is training, validation or test exactly once
    assert mask.sum() + 2 * len(split.evaluated) == len(seqs.targets)


def test_train_queries_predict_every_training_event_with_enough_history(write):
    _, seqs, split = _prepare(write)
    queries = split.train_queries(seqs, min_history=1)
    assert queries.position.tolist() == [2, 7]  # actor 2's 2nd event, actor 4's 2nd event
    queries = split.train_queries(seqs, min_history=0)
    assert queries.position.tolist() == [0, 1, 2, 3, 6, 7]


def test_target_stats_frequency_floor_and_active_pool(write):
    config, seqs, split = _prepare(write, freq_exponent=0.75, active_since_fraction=0.5)
    stats = TargetStats.compute(seqs, split, config)
    assert stats.counts.sum() == split.train_mask(seqs).sum()
    assert stats.log_q.dtype == np.float32  # what the loss reads; the model shares the array
    q = np.exp(stats.log_q.astype(np.float64))
    np.testing.assert_allclose(q.sum(), 1.0, rtol=1e-6)  # float32 rounding of each log q
    assert (q > 0).all()  # the floor keeps never-trained targets sampleable
    weights = np.maximum(stats.counts, 1.0) ** 0.75
    np.testing.assert_allclose(q, weights / weights.sum(), rtol=1e-6)
    # time range 1..40, cut-off 20: training events at t >= 20 are only actor 4's (3 @ t=20)
    ids = load_events(config).target_ids
    assert ids.to_raw(stats.active_pool) == [3]
    assert sorted(ids.to_raw(stats.candidates)) == [1, 2, 3, 5, 6, 7, 8, 9]


def test_target_masks_are_held_as_bits_and_read_back_exactly():
    rng = np.random.default_rng(3)
    for num_targets in (0, 1, 7, 8, 9, 61):
        is_candidate, active = rng.random(num_targets) < 0.5, rng.random(num_targets) < 0.3
        stats = TargetStats.of_masks(np.zeros(num_targets, np.int32), np.zeros(num_targets, np.float32), is_candidate, active)
        assert stats.candidate_bits.nbytes == stats.active_bits.nbytes == (num_targets + 7) // 8
        assert np.array_equal(stats.is_candidate, is_candidate) and np.array_equal(stats.active, active)
        assert stats.num_candidates == is_candidate.sum() and stats.pool_size == active.sum()
        assert np.array_equal(stats.active_pool, np.flatnonzero(active))
        for start in range(-1, num_targets + 2):
            for stop in range(start, num_targets + 3):
                inside = np.flatnonzero(is_candidate)
                expected = inside[(inside >= start) & (inside < stop)]
                got = stats.candidates_in(start, stop)
                assert got.dtype == np.int64 and np.array_equal(got, expected), (num_targets, start, stop)
