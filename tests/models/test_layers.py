"""Layers: dropout."""

from __future__ import annotations

import pytest
import torch

from models.layers import Dropout


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
