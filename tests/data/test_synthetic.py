"""The synthetic generator has the shape of the real logs."""

from __future__ import annotations

import numpy as np

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
