"""Length groups and the HSTU's hand-written kernels: the split is the cheapest one, a
grouped encoder computes what the ungrouped one computes (outputs and gradients), and the
custom autograd functions have the gradients of the ops they replace."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from models.hstu import HSTUEncoder, _BiasLookup, _SiLUAttentionWeights
from models.layers import Dropout
from models.length_groups import length_groups, plan_groups
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


def _left_padded_inputs(lengths, width, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    mask = torch.arange(width)[None] >= (width - torch.tensor(lengths))[:, None]
    target = torch.randn(batch, width, dim, generator=gen) * mask[..., None]
    action = torch.randn(batch, width, dim, generator=gen) * mask[..., None]
    timestamp = torch.cumsum(torch.randint(0, 5000, (batch, width), generator=gen), 1) * mask
    return target, action, timestamp, mask


@pytest.mark.parametrize("encoder_kind", ["hstu", "transformer"])
def test_a_grouped_encoder_gives_the_ungrouped_outputs_and_gradients(encoder_kind):
    torch.manual_seed(0)
    lengths, width, dim = [0, 1, 3, 12, 5, 12, 2, 9], 12, 16
    if encoder_kind == "hstu":
        encoder = HSTUEncoder(dim, width, num_layers=2, num_heads=2, dropout=0.0).eval()
    else:
        encoder = TransformerEncoder(dim, width, num_layers=2, num_heads=2, dropout=0.0, causal=True).eval()
    encoder.group_overhead = 0.0  # split as finely as the cost model likes
    results = {}
    for grouped in (False, True):
        encoder.length_grouping = grouped
        inputs = [t.clone().requires_grad_(t.is_floating_point()) for t in _left_padded_inputs(lengths, width, dim)]
        per_row = []
        if encoder_kind == "hstu":
            gen = torch.Generator().manual_seed(1)
            per_row = [torch.randn(len(lengths), dim, generator=gen).requires_grad_(),
                       torch.randn(len(lengths), dim, generator=gen), torch.full((len(lengths),), 10**6)]
        out = encoder(*inputs, *per_row)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        (out * weights * inputs[3][..., None]).sum().backward()  # real positions only
        results[grouped] = (out * inputs[3][..., None], inputs[0].grad, inputs[1].grad)
    assert len(length_groups(torch.tensor(lengths), encoder.quadratic_weight, 0.0)) > 1
    for ungrouped, grouped in zip(results[False], results[True]):
        torch.testing.assert_close(grouped, ungrouped, atol=1e-5, rtol=1e-5)


def test_bias_lookup_and_silu_weights_have_the_gradients_of_the_plain_ops():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(3, 10, dtype=torch.float64, generator=gen, requires_grad=True)
    index = torch.randint(0, 10, (2, 4, 4), generator=gen)
    assert torch.autograd.gradcheck(lambda t: _BiasLookup.apply(t, index), (table,))
    reference = torch.nn.functional.embedding(index, table.t()).permute(0, 3, 1, 2)
    torch.testing.assert_close(_BiasLookup.apply(table, index), reference)

    pre = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    multiplier = torch.rand(2, 1, 4, 4, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(lambda p: _SiLUAttentionWeights.apply(p, multiplier), (pre,))
    torch.testing.assert_close(_SiLUAttentionWeights.apply(pre, multiplier), torch.nn.functional.silu(pre) * multiplier)


def test_dropout_keeps_the_mean_drops_at_rate_p_and_passes_its_mask_to_the_gradient():
    torch.manual_seed(0)
    layer = Dropout(0.3)
    x = torch.ones(400, 1000, requires_grad=True)
    out = layer(x)
    assert (out == 0).float().mean().item() == pytest.approx(0.3, abs=0.005)
    assert out.mean().item() == pytest.approx(1.0, abs=0.01)
    out.sum().backward()
    torch.testing.assert_close(x.grad, out.detach())  # d out / d x = the scaled mask
    torch.manual_seed(0)
    torch.testing.assert_close(Dropout(0.3)(torch.ones(400, 1000)), out.detach())  # seeded like torch
    assert layer.eval()(x) is x
    with pytest.raises(ValueError, match="0 <= p < 1"):
        Dropout(1.0)
