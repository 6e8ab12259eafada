"""Towers and encoders: padding invariance, jagged vs padded, HSTU causality, FiLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.hstu import HSTUEncoder, film
from models.towers import QueryInputs
from tests.models.conftest import builder, tiny_model, tiny_sequences

ENCODERS = [
    {"encoder": "hstu"},
    {"encoder": "transformer", "loss": {"temporal_weight": 0.0}},
    {"encoder": "transformer", "causal": True, "pooling": "last", "activation": "swiglu"},
]


def _inputs(model, batch, extra_padding: int = 0) -> QueryInputs:
    looked_up = model._lookup(
        batch.query_values("actor"), batch.query_values("next_action"), batch.history, torch.zeros((batch.batch_size, 0), dtype=torch.int64)
    )
    inputs = model._query_inputs(looked_up, batch.history, batch.query_values("next_timestamp"))
    if extra_padding:
        pad = lambda t: torch.cat([torch.zeros_like(t[:, :1]).expand(-1, extra_padding, *t.shape[2:]), t], dim=1)  # noqa: E731
        inputs = QueryInputs(
            pad(inputs.history_target_BLD), pad(inputs.history_action_BLD), pad(inputs.history_timestamp_BL),
            pad(inputs.mask_BL), inputs.actor_BD, inputs.next_action_BD, inputs.next_timestamp_B,
        )
    return inputs


@pytest.mark.parametrize("overrides", ENCODERS)
def test_query_vector_does_not_change_with_padding_length(overrides):
    seqs = tiny_sequences()
    model = tiny_model(seqs, **dict(overrides)).eval()
    batch = builder(seqs, max_len=8).build(np.arange(6))
    with torch.no_grad():
        short = model.query_tower(_inputs(model, batch)).query_BD
        long = model.query_tower(_inputs(model, batch, extra_padding=5)).query_BD
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-5)
    norms = short.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


@pytest.mark.parametrize("overrides", ENCODERS)
def test_jagged_forward_agrees_with_the_padded_tower(overrides):
    seqs = tiny_sequences()
    model = tiny_model(seqs, **dict(overrides)).eval()
    batch = builder(seqs, max_len=8).build(np.arange(6))
    with torch.no_grad():
        jagged = model(batch.query_values("actor"), batch.query_values("next_action"), batch.history, batch.query_values("next_timestamp"))
        padded = model.query_tower(_inputs(model, batch, extra_padding=3)).query_BD
    torch.testing.assert_close(jagged, padded, atol=1e-5, rtol=1e-5)


def test_empty_history_gives_a_finite_query_vector():
    seqs = tiny_sequences()
    for overrides in ENCODERS:
        model = tiny_model(seqs, **dict(overrides)).eval()
        b = builder(seqs, max_len=8)
        b.queries.position[:] = b.queries.history_start  # no earlier events
        batch = b.build(np.arange(3))
        with torch.no_grad():
            vectors = model(batch.query_values("actor"), batch.query_values("next_action"), batch.history)
        assert torch.isfinite(vectors).all()


def test_hstu_is_causal_a_later_token_never_changes_an_earlier_output():
    torch.manual_seed(0)
    encoder = HSTUEncoder(16, 10, num_layers=2, num_heads=2, dropout=0.0).eval()
    batch, length = 2, 10
    target = torch.randn(batch, length, 16)
    action = torch.randn(batch, length, 16)
    times = torch.arange(length)[None].expand(batch, -1) * 3600 + 1_000_000
    mask = torch.ones(batch, length, dtype=torch.bool)
    actor, query_action, query_time = torch.randn(batch, 16), torch.randn(batch, 16), times[:, -1] + 60
    with torch.no_grad():
        before = encoder(target, action, times, mask, actor, query_action, query_time)
        changed_target = target.clone()
        changed_target[:, 7] += 5.0
        changed_times = times.clone()
        changed_times[:, 8:] += 10**6
        after = encoder(changed_target, action, changed_times, mask, actor, query_action, query_time)
    # Positions 0..6 see neither the changed token 7 nor the changed times of 8, 9.
    # (Position 6's "next event" is token 7: its action/time, not its target, condition it.)
    torch.testing.assert_close(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_film_with_zero_gamma_and_beta_is_the_identity():
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(film(x, torch.zeros(2, 8), torch.zeros(2, 8)), x)
    assert not torch.allclose(film(x, torch.ones(2, 8), torch.zeros(2, 8)), x)
