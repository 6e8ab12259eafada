"""Negative samplers: the streaming frequency estimator."""

from __future__ import annotations

import math

import torch

from models.samplers import StreamingFrequencyEstimator


def test_streaming_estimator_learns_appearance_rates():
    estimator = StreamingFrequencyEstimator(num_buckets=1024, alpha=0.05)
    for step in range(2000):
        ids = [1] + ([2] if step % 4 == 0 else []) + ([3] if step % 20 == 0 else [])
        estimator.update(torch.tensor(ids))
    rates = estimator.log_expected_count(torch.tensor([1, 2, 3])).exp()
    torch.testing.assert_close(rates.double(), torch.tensor([1.0, 0.25, 0.05], dtype=torch.float64), rtol=0.05, atol=0.0)
    restored = StreamingFrequencyEstimator(num_buckets=1024, alpha=0.05)
    restored.load_state_dict(estimator.state_dict())
    torch.testing.assert_close(restored.log_expected_count(torch.tensor([2])), estimator.log_expected_count(torch.tensor([2])))
    assert math.isfinite(float(rates.sum()))
