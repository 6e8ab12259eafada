"""What the builders hand the model: per-target arrays shared, not copied, on every rank."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from configs.loading import load_config
from data.prepare import prepare
from trainer.build import build_model

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


def test_the_model_reads_the_statistics_log_q_without_a_copy():
    """At 1e7 targets a copy is 40 MB more on every rank, whatever its share."""
    config = load_config(CONFIG)
    prepared = prepare(config.data)
    model = build_model(config, prepared)
    assert prepared.stats.log_q.dtype == np.float32
    assert model.in_batch.log_p.data_ptr() == prepared.stats.log_q.ctypes.data
