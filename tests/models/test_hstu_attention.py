"""The HSTU's hand-written attention: the blocked causal attention computes, and
differentiates, what the eager ops it replaces do, also under bf16 autocast."""

from __future__ import annotations

import pytest
import torch

import models.hstu_attention as hstu_attention
from models.hstu import RelativeAttentionBias


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
