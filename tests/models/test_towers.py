"""Towers and encoders: padding invariance, empty histories, HSTU causality, FiLM, what the
query vector reads from the clock."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.hstu import HSTUEncoder, film
from models.length_groups import Jagged, JaggedHistory
from tests.models.conftest import builder, tiny_model, tiny_sequences

ENCODERS = [
    {"encoder": "hstu"},
    {"encoder": "hstu", "time_features": True},
    {"encoder": "transformer", "loss": {"temporal_weight": 0.0}},
    {"encoder": "transformer", "causal": True, "pooling": "last", "activation": "swiglu", "time_features": True},
]


def _query_vectors(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch.query_values("actor"), batch.query_values("next_action"), batch.history,
                     batch.query_values("next_timestamp"))


def _encoder(model):
    return model.query_tower.hstu if model.model_config.encoder == "hstu" else model.query_tower.transformer


@pytest.mark.parametrize("overrides", ENCODERS)
def test_a_rows_query_vector_does_not_depend_on_how_far_it_is_padded(overrides):
    # Histories of 1 to 6 events; in one block (no length groups) the short rows are
    # padded to the longest; alone, no row is padded at all.
    seqs = tiny_sequences()
    model = tiny_model(seqs, **dict(overrides)).eval()
    b = builder(seqs, max_len=8)
    b.queries.history_start[:] = b.queries.position - np.arange(1, 7)
    _encoder(model).grouping.enabled = False
    together = _query_vectors(model, b.build(np.arange(6)))
    alone = torch.cat([_query_vectors(model, b.build(np.array([i]))) for i in range(6)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    norms = together.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


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
    encoder = HSTUEncoder(16, 10, num_layers=2, num_heads=2, dropout=0.0, time_features=True).eval()
    batch, length = 2, 10
    target = torch.randn(batch * length, 16)
    action = torch.randn(batch * length, 16)
    times = (torch.arange(length)[None].expand(batch, -1) * 3600 + 1_000_000).reshape(-1)
    jagged = Jagged(torch.full((batch,), length))
    actor, query_action, query_time = torch.randn(batch, 16), torch.randn(batch, 16), times[length - 1 :: length] + 60
    with torch.no_grad():
        before = encoder(JaggedHistory(target, action, times, jagged), actor, query_action, query_time)
        changed_target = target.clone()
        changed_target[[7, length + 7]] += 5.0
        changed_times = times.reshape(batch, length).clone()
        changed_times[:, 8:] += 10**6
        after = encoder(JaggedHistory(changed_target, action, changed_times.reshape(-1), jagged), actor, query_action,
                        query_time)
    before, after = before.reshape(batch, length, -1), after.reshape(batch, length, -1)
    # Positions 0..6 see neither the changed token 7 nor the changed times of 8, 9.
    # (Position 6's "next event" is token 7: its action/time, not its target, condition it.)
    torch.testing.assert_close(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_film_with_zero_gamma_and_beta_is_the_identity():
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(film(x, torch.zeros(2, 8), torch.zeros(2, 8)), x)
    assert not torch.allclose(film(x, torch.ones(2, 8), torch.zeros(2, 8)), x)


@pytest.mark.parametrize("encoder", ["hstu", "transformer"])
@pytest.mark.parametrize("time_features", [False, True])
def test_the_query_vector_reads_the_clock_only_through_the_cyclic_time_features(encoder, time_features):
    # Shifting every timestamp by a constant keeps every time gap. Without the cyclic
    # features the query vector sees only gaps; with them it also sees hour and weekday,
    # which a whole week's shift keeps and a six hours' shift does not.
    seqs = tiny_sequences()
    model = tiny_model(seqs, encoder=encoder, causal=True, time_features=time_features).eval()

    def vectors(shift_seconds: int) -> torch.Tensor:
        shifted = dataclasses.replace(seqs, timestamps=seqs.timestamps + shift_seconds)
        return _query_vectors(model, builder(shifted).build(np.arange(seqs.num_sequences)))

    base = vectors(0)
    torch.testing.assert_close(vectors(7 * 24 * 3600), base, atol=1e-5, rtol=1e-5)
    six_hours_later = vectors(6 * 3600)
    if time_features:
        assert (six_hours_later - base).abs().max() > 1e-3
    else:
        torch.testing.assert_close(six_hours_later, base, atol=1e-5, rtol=1e-5)
