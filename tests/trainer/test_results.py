"""Result files are strict JSON: a metric no query produced is null, never a bare NaN."""

from __future__ import annotations

import json
import math

from trainer.results import write_results


def test_non_finite_metrics_are_written_as_null(tmp_path):
    results = {"metrics": {"valid": {"model": {"ndcg@10": math.nan, "mean_rank": math.inf, "mrr": 0.5}}}, "n": [1.0, -math.inf]}
    write_results(tmp_path, results, "| table |")
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    # A strict reader (no NaN constants) reads it back.
    loaded = json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert loaded == {"metrics": {"valid": {"model": {"ndcg@10": None, "mean_rank": None, "mrr": 0.5}}}, "n": [1.0, None]}
