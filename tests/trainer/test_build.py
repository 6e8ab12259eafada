"""What the builders hand the model: per-target arrays shared, not copied, on every rank."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from configs.loading import load_config
from data.prepare import prepare
from trainer.build import build_model, train_batch_builder

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


def test_the_model_reads_the_statistics_log_q_without_a_copy():
    """At 1e7 targets a copy is 40 MB more on every rank, whatever its share."""
    config = load_config(CONFIG)
    prepared = prepare(config.data)
    model = build_model(config, prepared)
    assert prepared.stats.log_q.dtype == np.float32
    assert model.in_batch.log_p.data_ptr() == prepared.stats.log_q.ctypes.data


def test_the_random_pool_is_held_as_ids_only_where_random_negatives_are_drawn():
    """The pool is a [T] mask in the statistics (packed in bits); its [P] int64 IDs (68 MB at 1e7 targets)
    go to the training batches' builder only when they draw from it."""
    config = load_config(CONFIG, ["loader.num_rand_negs=4"])
    prepared = prepare(config.data)
    assert prepared.stats.active.dtype == bool and len(prepared.stats.active) == prepared.seqs.num_targets
    drawing = train_batch_builder(config, prepared)
    assert np.array_equal(drawing.active_pool, np.flatnonzero(prepared.stats.active))
    model = build_model(config, prepared)
    assert model.random.pool_size == prepared.stats.pool_size == len(drawing.active_pool) > 0
    assert np.array_equal(model.random.in_pool.numpy()[: prepared.seqs.num_targets], prepared.stats.active)

    no_draws = load_config(CONFIG, ["loader.num_rand_negs=0"])
    builder = train_batch_builder(no_draws, prepared)
    assert len(builder.active_pool) == 0
    batch = builder.build(np.arange(3), np.random.default_rng(0))
    assert tuple(batch.random_negatives.shape) == (3, 0)
