"""Batches: the KJT layout, truncation at batch time and the left-padded dense view."""

from __future__ import annotations

import numpy as np
import torch

from data.batches import BatchBuilder, BatchSpec
from data.sequences import Queries, Sequences


def _seqs() -> Sequences:
    # actor 0: targets 10..14 at t=100..104 ; actor 1: targets 20, 21
    return Sequences(
        actor=np.array([0, 1]),
        offsets=np.array([0, 5, 7]),
        targets=np.array([10, 11, 12, 13, 14, 20, 21]),
        actions=np.array([0, 1, 0, 1, 0, 2, 2], dtype=np.int32),
        timestamps=np.arange(100, 107),
        num_targets=30,
        num_actors=2,
        num_actions=3,
    )


def test_batch_holds_truncated_history_and_query_fields():
    seqs = _seqs()
    queries = Queries(sequence=np.array([0, 1]), position=np.array([4, 6]), history_start=np.array([0, 5]))
    builder = BatchBuilder(seqs, queries, BatchSpec(history_window=3), active_pool=np.array([1, 2]))
    batch = builder.build(np.array([0, 1]))
    history = batch.history
    assert history["history_target"].lengths().tolist() == [3, 1]
    assert history["history_target"].values().tolist() == [11, 12, 13, 20]  # last 3 before position 4
    assert history["history_action"].values().tolist() == [1, 0, 1, 2]
    assert history["history_timestamp"].values().tolist() == [101, 102, 103, 105]
    assert batch.query_values("actor").tolist() == [0, 1]
    assert batch.query_values("next_action").tolist() == [0, 2]
    assert batch.query_values("next_timestamp").tolist() == [104, 106]
    assert batch.target.tolist() == [14, 21]
    assert batch.random_negatives.shape == (2, 0)


def test_random_negatives_come_from_the_active_pool_and_follow_the_rng():
    seqs = _seqs()
    queries = Queries(sequence=np.array([0]), position=np.array([4]), history_start=np.array([0]))
    builder = BatchBuilder(seqs, queries, BatchSpec(3, num_rand_negs=50), active_pool=np.array([3, 7, 9]))
    a = builder.build(np.array([0]), np.random.default_rng(1)).random_negatives
    b = builder.build(np.array([0]), np.random.default_rng(1)).random_negatives
    assert a.shape == (1, 50)
    assert set(a.flatten().tolist()) <= {3, 7, 9}
    assert torch.equal(a, b)


def test_batch_moves_and_pins_as_a_whole():
    seqs = _seqs()
    queries = Queries(sequence=np.array([0]), position=np.array([2]), history_start=np.array([0]))
    batch = BatchBuilder(seqs, queries, BatchSpec(5), active_pool=np.array([1])).build(np.array([0]))
    moved = batch.to(torch.device("cpu"))
    assert torch.equal(moved.target, batch.target)
    assert torch.equal(moved.history.values(), batch.history.values())
