"""Learning-rate schedule."""

from __future__ import annotations

import pytest

from configs.schema import OptimConfig
from trainer.loop import lr_factor


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_warmup_then_decay_reaches_its_end_points(decay):
    config = OptimConfig(warmup_steps=10, decay=decay, min_lr_ratio=0.1)
    assert lr_factor(0, 100, config) == pytest.approx(0.1)
    assert lr_factor(9, 100, config) == pytest.approx(1.0)
    assert lr_factor(10, 100, config) == pytest.approx(1.0)
    assert lr_factor(100, 100, config) == pytest.approx(0.1)
    values = [lr_factor(s, 100, config) for s in range(10, 101)]
    assert values == sorted(values, reverse=True)


def test_no_decay_keeps_the_rate_after_warmup():
    config = OptimConfig(warmup_steps=0, decay="none")
    assert lr_factor(0, 10, config) == lr_factor(9, 10, config) == 1.0
