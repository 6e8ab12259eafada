"""The split, the metrics and both baselines reproduce the benchmark's reference figures."""

from __future__ import annotations

import pytest

from configs.schema import BaselineConfig, DataConfig, EvalConfig
from data.prepare import prepare
from trainer.results import evaluate_baselines

REFERENCE = {
    # data set: (evaluated actors, candidates, {model: (NDCG@10, HR@10)})
    "collegemsg": (1077, 1862, {"most_popular": (0.0268, 0.0427), "recency_frequency": (0.4533, 0.5506)}),
    "ml-100k": (943, 1682, {"most_popular": (0.0220, 0.0498)}),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_baselines_reproduce_reference_figures(name):
    evaluated, candidates, figures = REFERENCE[name]
    prepared = prepare(DataConfig(path=f"embedded:{name}"))
    assert len(prepared.split.evaluated) == evaluated
    assert len(prepared.stats.candidates) == candidates
    metrics = evaluate_baselines(prepared, "test", BaselineConfig(recency_half_life_events=1.0), EvalConfig(candidate_chunk_size=500))
    for model, (ndcg, hr) in figures.items():
        assert round(metrics[model]["ndcg@10"], 4) == ndcg, model
        assert round(metrics[model]["hr@10"], 4) == hr, model
