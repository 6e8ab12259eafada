"""Each person's own recent activity (data/activity.py): the features against a count made
by hand, only known events read, and every person answered by exactly one rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from configs.loading import load_config
from data.activity import ACTIVITY_FEATURES, ActivityIndex, ContactActivity
from data.dataset import PreparedDataset, ensure_prepared
from data.prepare import prepare, prepare_from_dataset, resolve_data_path
from tests.trainer.smoke import CONFIG_DIR


def _by_hand(people: np.ndarray, times: np.ndarray, person: int, now: int) -> list[float]:
    mine = times[(people == person) & (times < now)]
    hours = (now - mine.max()) / 3600 if len(mine) else 1e6
    return [np.log1p(hours) / 5, np.log1p(np.sum(mine >= now - 3600)), np.log1p(np.sum(mine >= now - 86400)),
            np.log1p(len(mine))]


def test_features_count_each_persons_events_strictly_before_the_query_time():
    rng = np.random.default_rng(0)
    people, times = rng.integers(0, 30, 2000), rng.integers(0, 200_000, 2000)
    index = ActivityIndex.from_events(people, times, num_people=31)  # person 30 has no event
    asked, now = rng.integers(0, 31, 400), rng.integers(-100, 250_000, 400)
    # Queries at the very second of an event: that event is not known yet.
    asked[:50], now[:50] = people[:50], times[:50]
    got = index.features(asked, now)
    assert got.shape == (400, ACTIVITY_FEATURES) and got.dtype == np.float32
    expected = np.array([_by_hand(people, times, p, t) for p, t in zip(asked, now)])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert (expected[:, 3] > 0).any() and (expected[:, 1] > 0).any()  # counts that can be wrong


def test_a_person_outside_the_id_space_is_refused():
    with pytest.raises(ValueError, match=r"people must lie in \[0, 3\)"):
        ActivityIndex.from_events(np.array([0, 3]), np.array([1, 2]), num_people=3)


def test_an_empty_index_answers_never_active():
    index = ActivityIndex.from_events(np.zeros(0, np.int64), np.zeros(0, np.int64), num_people=2)
    got = index.features(np.array([0, 1]), np.array([5, 6]))
    np.testing.assert_allclose(got[:, 0], np.log1p(1e6) / 5)
    assert not got[:, 1:].any()


def test_a_rank_answers_only_for_the_people_it_owns():
    people, times = np.array([0, 1, 1, 2]), np.array([10, 20, 30, 40])
    index = ActivityIndex.from_events(people, times, num_people=3)
    lookup = ContactActivity(index, owns=lambda p: p != 1)
    got = lookup(torch.tensor([0, 1, 2]), torch.tensor([100, 100, 100]))
    assert got.dtype == torch.float32
    assert not got[1].any()
    torch.testing.assert_close(got[[0, 2]], torch.from_numpy(index.features(np.array([0, 2]), np.array([100, 100]))))


def _collegemsg():
    config = load_config(CONFIG_DIR / "smoke.yaml", [])
    return config, prepare(config.data)


def test_each_split_reads_only_the_events_known_at_its_queries():
    """Training and validation queries read training events; test queries validation
    events too; inference every event. Each event counts for its sender and its receiver."""
    _, prepared = _collegemsg()
    seqs, split = prepared.seqs, prepared.split
    sender = np.repeat(seqs.actor, seqs.lengths)
    end_of_time = int(seqs.timestamps.max()) + 1
    for known, mask in [("train", split.known_mask(seqs, "valid")), ("valid", split.known_mask(seqs, "valid")),
                        ("test", split.known_mask(seqs, "test")), ("all", np.ones(len(seqs.targets), bool))]:
        index = prepared.activity(known)
        people = np.arange(index.num_people)
        total = np.expm1(index.features(people, np.full(len(people), end_of_time))[:, 3]).round()
        expected = np.bincount(sender[mask], minlength=len(people)) + np.bincount(seqs.targets[mask], minlength=len(people))
        np.testing.assert_array_equal(total, expected)
        # At any time: the same as one sorted copy of those events (checked by hand above).
        rng = np.random.default_rng(1)
        asked = rng.integers(0, len(people), 3000)
        now = rng.integers(int(seqs.timestamps.min()), end_of_time + 86400, 3000)
        now[:500] = seqs.timestamps[rng.integers(0, len(seqs.timestamps), 500)]  # at an event's second
        copy = ActivityIndex.from_events(np.r_[sender[mask], seqs.targets[mask]],
                                         np.r_[seqs.timestamps[mask], seqs.timestamps[mask]], len(people))
        np.testing.assert_array_equal(index.features(asked, now), copy.features(asked, now))
    assert prepared.activity("train") is prepared.activity("valid")  # built once


def test_every_person_is_owned_by_exactly_one_rank(tmp_path):
    config, prepared = _collegemsg()
    people = np.arange(prepared.seqs.num_targets)
    assert prepared.people_of_rank(0, 1) is None  # one process: every one
    for world in (2, 3):
        owners = np.stack([prepared.people_of_rank(rank, world)(people) for rank in range(world)])
        np.testing.assert_array_equal(owners.sum(axis=0), 1)
    # A share read for one rank of two owns the people whose events it holds, sent and received.
    ensure_prepared(config.data, tmp_path, resolve_data_path(config.data.path))
    share = prepare_from_dataset(PreparedDataset.open(tmp_path), config.data, 1, 2)
    owned = share.people_of_rank(1, 2)(people)
    np.testing.assert_array_equal(owned, prepared.people_of_rank(1, 2)(people))
    whole, held = prepared.activity("test"), share.activity("test")
    now = np.full(owned.sum(), int(prepared.seqs.timestamps.max()) + 1)
    np.testing.assert_array_equal(held.features(people[owned], now), whole.features(people[owned], now))
    with pytest.raises(ValueError, match="cannot be split for another"):
        share.people_of_rank(0, 3)
