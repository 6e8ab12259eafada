"""Length groups: the split is the cheapest one, and a grouped encoder computes what the
ungrouped one computes (outputs and gradients)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from models.hstu import HSTUEncoder
from models.length_groups import Jagged, JaggedHistory, plan_groups
from models.transformer import TransformerEncoder


def _cost(groups, quadratic_weight, overhead):
    return sum(len(rows) * (w + quadratic_weight * w * w) + overhead for rows, w in groups)


@pytest.mark.parametrize("seed", range(6))
def test_the_plan_covers_every_row_once_and_is_the_cheapest_split(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 40, size=int(rng.integers(1, 8)))
    weight, overhead = 0.05, float(rng.choice([0.0, 5.0, 50.0]))
    groups = plan_groups(lengths, weight, overhead)
    rows = np.concatenate([r for r, _ in groups])
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    assert all(w >= max(1, lengths[r].max()) for r, w in groups)
    # Brute force over every split of the sorted rows into contiguous runs.
    widths = np.maximum(np.sort(lengths), 1)
    best = min(
        sum((end - start) * (widths[end - 1] + weight * widths[end - 1] ** 2) + overhead
            for start, end in zip((0, *cuts), (*cuts, len(lengths))))
        for k in range(len(lengths))
        for cuts in itertools.combinations(range(1, len(lengths)), k)
    )
    assert _cost(groups, weight, overhead) == pytest.approx(best)


def test_one_group_when_splitting_does_not_pay():
    assert len(plan_groups(np.array([3, 50, 7, 50]), 0.01, 1e9)) == 1
    assert len(plan_groups(np.array([1, 100]), 0.01, 0.0)) == 2


@pytest.mark.parametrize("encoder_kind", ["hstu", "transformer"])
def test_a_grouped_encoder_gives_the_ungrouped_outputs_and_gradients(encoder_kind):
    torch.manual_seed(0)
    lengths, dim = torch.tensor([0, 1, 3, 12, 5, 12, 2, 9]), 16
    if encoder_kind == "hstu":
        encoder = HSTUEncoder(dim, 12, num_layers=2, num_heads=2, dropout=0.0, time_features=True).eval()
    else:
        encoder = TransformerEncoder(dim, 12, num_layers=2, num_heads=2, dropout=0.0, causal=True,
                                     time_features=True).eval()
    encoder.grouping.group_overhead = 0.0  # split as finely as the cost model likes
    assert len(encoder.grouping.groups(lengths)) > 1
    gen = torch.Generator().manual_seed(1)
    total, batch = int(lengths.sum()), len(lengths)
    target, action = torch.randn(total, dim, generator=gen), torch.randn(total, dim, generator=gen)
    timestamp = torch.cumsum(torch.randint(0, 5000, (total,), generator=gen), 0)
    per_row = [torch.randn(batch, dim, generator=gen), torch.randn(batch, dim, generator=gen),
               torch.full((batch,), 10**7)] if encoder_kind == "hstu" else []
    results = {}
    for grouped in (False, True):
        encoder.grouping.enabled = grouped
        leaves = [target.clone().requires_grad_(), action.clone().requires_grad_()]
        out = encoder(JaggedHistory(*leaves, timestamp, Jagged(lengths)), *per_row)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        results[grouped] = (out, leaves[0].grad, leaves[1].grad)
    assert results[True][0].shape[0] == int(lengths.clamp(min=1).sum())  # one output per position
    for ungrouped, grouped in zip(results[False], results[True]):
        torch.testing.assert_close(grouped, ungrouped, atol=1e-5, rtol=1e-5)
