"""The synthetic generator has the shape of the real logs."""

from __future__ import annotations

import numpy as np
import pytest

from configs.schema import DataConfig
from data.prepare import prepare
from data.readers import DataError
from data.synthetic import SyntheticLogSpec, generate


def test_synthetic_log_is_heavy_tailed_repetitive_and_bursty():
    frame = generate(SyntheticLogSpec(num_events=50_000, num_actors=2_000, num_targets=20_000, seed=1))
    assert frame.height == 50_000
    assert (np.diff(frame["timestamp"].to_numpy()) >= 0).all()  # written in time order
    activity = np.sort(frame["actor"].value_counts()["count"].to_numpy())[::-1]
    popularity = np.sort(frame["target"].value_counts()["count"].to_numpy())[::-1]
    # heavy tails: the top 1% hold far more than 1% of the events
    assert activity[: len(activity) // 100].sum() > 0.05 * frame.height
    assert popularity[: max(len(popularity) // 100, 1)].sum() > 0.05 * frame.height
    # repeat contact: a large share of events go to a target the actor already contacted
    sorted_ = frame.sort("actor", "timestamp", maintain_order=True)
    pairs = sorted_.select("actor", "target").is_duplicated()
    assert pairs.mean() > 0.4
    # bursts: most gaps inside an actor's sequence are short, some are long
    gaps = sorted_.with_columns(gap=frame.sort("actor", "timestamp")["timestamp"].diff()).filter(
        sorted_["actor"].diff() == 0
    )["gap"].to_numpy()
    assert np.median(gaps) < 3600 and np.percentile(gaps, 95) > 86400


def test_shared_id_space_never_has_self_contact():
    frame = generate(SyntheticLogSpec(num_events=10_000, num_actors=500, num_targets=500, shared_id_space=True))
    assert (frame["actor"] != frame["target"]).all()
    assert frame["target"].max() < 500


def test_cover_targets_makes_every_target_id_appear():
    frame = generate(SyntheticLogSpec(num_events=3000, num_actors=100, num_targets=2000, cover_targets=True))
    assert frame["target"].n_unique() == 2000
    with pytest.raises(ValueError, match="num_events >= num_targets"):
        SyntheticLogSpec(num_events=10, num_actors=2, num_targets=20, cover_targets=True)


def test_a_synthetic_data_path_generates_the_log_in_memory():
    prepared = prepare(DataConfig(path="synthetic:events=3e3,actors=1e2,targets=2e3,cover_targets=true,seed=1"))
    assert prepared.summary()["events"] == 3000 and prepared.summary()["targets"] == 2000
    for bad, message in [
        ("synthetic:events=1e3,actors=10", "missing targets"),
        ("synthetic:events=1e3,actors=10,targets=10,colour=red", "KEY one of"),
        ("synthetic:events=1.5,actors=10,targets=10", "events='1.5': expected a number"),
        ("synthetic:events=1e3,actors=10,targets=10,cover_targets=maybe", "expected true or false"),
    ]:
        with pytest.raises(DataError, match=message):
            prepare(DataConfig(path=bad))


def test_evaluation_can_sample_a_fixed_set_of_actors():
    prepared = prepare(DataConfig(path="synthetic:events=3e3,actors=1e2,targets=2e3"))
    valid = prepared.split.queries(prepared.seqs, "valid", max_queries=10)
    test = prepared.split.queries(prepared.seqs, "test", max_queries=10)
    assert len(valid) == 10 and (valid.sequence == test.sequence).all()
    assert set(valid.sequence) <= set(prepared.split.evaluated)
    assert len(prepared.split.queries(prepared.seqs, "test", max_queries=10**6)) == len(prepared.split.evaluated)
