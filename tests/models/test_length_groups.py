"""Length groups and the HSTU's hand-written attention: the split is the cheapest one, a
grouped encoder computes what the ungrouped one computes (outputs and gradients), and the
blocked causal attention computes, and differentiates, what the eager ops it replaces do."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import models.hstu_attention as hstu_attention
from models.hstu import HSTUEncoder, RelativeAttentionBias
from models.layers import Dropout
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


@pytest.mark.parametrize("block", [3, 64])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("keep", [0, 2**24], ids=["recomputed", "kept"])
def test_blocked_causal_attention_equals_the_materialised_eager_attention(monkeypatch, block, with_bias, keep):
    monkeypatch.setattr(hstu_attention, "BLOCK", block)  # several blocks, a ragged last one
    monkeypatch.setattr(hstu_attention, "KEEP_ELEMENTS", keep)  # backward recomputes, or reuses
    gen = torch.Generator().manual_seed(0)
    batch, heads, positions, width = 2, 3, 8, 4
    q, k, v = (torch.randn(batch * heads, positions, width, dtype=torch.float64, generator=gen) for _ in range(3))
    valid = torch.arange(positions)[None] >= torch.tensor([[0], [3]])  # row 1 left-padded
    mask = torch.ones(positions, positions, dtype=torch.bool).tril()[None] & valid[:, None] & valid[:, :, None]
    multiplier = (mask / valid.sum(1)[:, None, None]).to(torch.float64)[:, None]
    rab = RelativeAttentionBias(heads, positions, 16).double()
    torch.nn.init.normal_(rab.time_bias.weight, generator=gen)
    torch.nn.init.normal_(rab.position_bias.weight, generator=gen)
    timestamps = torch.cumsum(torch.randint(0, 10_000, (batch, positions), generator=gen), 1)
    scale = width**-0.5

    def run(blocked: bool):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        rab.zero_grad()
        if blocked:
            table, index = (rab.table(), rab.index(timestamps)) if with_bias else (None, None)
            y = hstu_attention.causal_silu_attention(*leaves, table, index, multiplier, heads, scale)
        else:
            pre = leaves[0] @ leaves[1].transpose(1, 2) * scale
            if with_bias:
                pre = pre + rab(timestamps).reshape(pre.shape)
            weights = torch.nn.functional.silu(pre.reshape(batch, heads, positions, positions)) * multiplier
            y = weights.reshape(pre.shape) @ leaves[2]
        (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)).sum().backward()
        grads = [t.grad for t in leaves]
        if with_bias:
            grads += [rab.time_bias.weight.grad.clone(), rab.position_bias.weight.grad.clone()]
        return y.detach(), grads

    (y_blocked, grads_blocked), (y_eager, grads_eager) = run(True), run(False)
    torch.testing.assert_close(y_blocked, y_eager)
    for blocked, eager in zip(grads_blocked, grads_eager):
        torch.testing.assert_close(blocked, eager)


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


@pytest.mark.parametrize("keep", [0, 2**24], ids=["recomputed", "kept"])
def test_blocked_attention_under_bf16_autocast_stays_within_bf16_rounding_of_fp64(monkeypatch, keep):
    """train.precision=bf16: q, k, v arrive in bf16 (from the autocast projections), the bias
    table and the multiplier in fp32; the function must run, give bf16 outputs and q/k/v
    gradients, an fp32 table gradient, and values within bf16 rounding of fp64."""
    monkeypatch.setattr(hstu_attention, "BLOCK", 3)
    monkeypatch.setattr(hstu_attention, "KEEP_ELEMENTS", keep)
    gen = torch.Generator().manual_seed(0)
    batch, heads, positions, width = 2, 2, 7, 8
    q, k, v = (torch.randn(batch * heads, positions, width, dtype=torch.float64, generator=gen) for _ in range(3))
    mask = torch.ones(positions, positions, dtype=torch.bool).tril()[None].expand(batch, -1, -1)
    multiplier = (mask / positions)[:, None].float()
    rab = RelativeAttentionBias(heads, positions, 16)
    timestamps = torch.cumsum(torch.randint(0, 10_000, (batch, positions), generator=gen), 1)
    upstream = torch.randn(batch * heads, positions, width, generator=gen, dtype=torch.float64)

    def run(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        table = rab.table().detach().to(torch.float32 if dtype == torch.bfloat16 else dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = hstu_attention.causal_silu_attention(
                *leaves, table, rab.index(timestamps), multiplier.to(table.dtype), heads, width**-0.5
            )
        (y.double() * upstream).sum().backward()
        return y, [t.grad for t in leaves], table.grad

    y16, grads16, table16 = run(torch.bfloat16)
    y64, grads64, table64 = run(torch.float64)
    assert y16.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads16)
    assert table16.dtype == torch.float32
    for low, exact in [(y16, y64), *zip(grads16, grads64), (table16, table64)]:
        error = (low.double() - exact).norm() / exact.norm()
        assert error < 2e-2, error  # bf16 keeps 8 bits: ~0.4% per rounding
