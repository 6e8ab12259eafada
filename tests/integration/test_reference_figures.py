"""The split, the metrics and the baselines reproduce the benchmark's reference figures
(../shared/BENCHMARK.md), and each recency-frequency rule's half-life is the one
validation NDCG@10 chooses."""

from __future__ import annotations

import dataclasses

import pytest

from configs.schema import BaselineConfig, DataConfig, EvalConfig
from data.dataset import PreparedDataset
from data.prepare import prepare
from trainer.results import baseline_results, evaluate_baselines

REFERENCE = {
    # data set: (evaluated actors, candidates, {model: (NDCG@10, HR@10, HR@1)}) at half-life 1
    "collegemsg": (
        1077,
        1862,
        {
            "most_popular": (0.0268, 0.0427, 0.0158),
            "recency_frequency": (0.4533, 0.5506, 0.3510),
            "two_way_recency_frequency": (0.6798, 0.7577, 0.5887),
        },
    ),
    "ml-100k": (943, 1682, {"most_popular": (0.0220, 0.0498, 0.0032)}),
}
# Validation NDCG@10 of each half-life (1, 5, 20, inf): what `auto` chooses from.
VALID_NDCG = {
    "collegemsg": {
        "recency_frequency": {"1": 0.4655, "5": 0.4200, "20": 0.3843, "inf": 0.3233},
        "two_way_recency_frequency": {"1": 0.6705, "5": 0.5737, "20": 0.4931, "inf": 0.3835},
    },
    # No repeat targets: the true target is never in the history, so no half-life moves a rank.
    "ml-100k": {"recency_frequency": {"1": 0.0, "5": 0.0, "20": 0.0, "inf": 0.0}},
}


@pytest.fixture(scope="module", params=sorted(REFERENCE))
def log(request):
    return request.param, prepare(DataConfig(path=f"embedded:{request.param}"))


def test_baselines_reproduce_reference_figures(log):
    name, prepared = log
    evaluated, candidates, figures = REFERENCE[name]
    assert len(prepared.split.evaluated) == evaluated
    assert len(prepared.stats.candidates) == candidates
    metrics = evaluate_baselines(
        prepared, "test", BaselineConfig(recency_half_life_events=1.0), EvalConfig(candidate_chunk_size=500)
    )
    # The two-way rule only where actors and targets are one ID space.
    assert ("two_way_recency_frequency" in metrics) == prepared.log.shared_id_space
    for model, (ndcg, hr10, hr1) in figures.items():
        assert round(metrics[model]["ndcg@10"], 4) == ndcg, model
        assert round(metrics[model]["hr@10"], 4) == hr10, model
        assert round(metrics[model]["hr@1"], 4) == hr1, model
    if name == "collegemsg":
        two_way = metrics["two_way_recency_frequency"]
        assert (round(two_way["mrr"], 4), round(two_way["mean_rank"], 1)) == (0.6569, 131.5)


def test_auto_chooses_each_half_life_on_validation_ndcg(log):
    name, prepared = log
    results = baseline_results(prepared, BaselineConfig(), EvalConfig())
    assert set(results.half_lives) == set(VALID_NDCG[name])
    for model, tried in VALID_NDCG[name].items():
        entry = results.half_lives[model]
        assert {h: round(v, 4) for h, v in entry["valid_ndcg@10"].items()} == tried
        # Half-life 1 is the best (or, on ml-100k, the first of equals) on both logs.
        assert (entry["half_life_events"], entry["chosen_by"]) == (1.0, "valid ndcg@10")
        assert round(results.metrics["valid"][model]["ndcg@10"], 4) == tried["1"]
    for model, (ndcg, _, _) in REFERENCE[name][2].items():
        assert round(results.metrics["test"][model]["ndcg@10"], 4) == ndcg, model
    assert "recency_frequency 1 (chosen on validation NDCG@10" in results.note()


def test_a_fixed_half_life_is_used_as_given(log):
    name, prepared = log
    results = baseline_results(prepared, BaselineConfig(recency_half_life_events=float("inf")), EvalConfig())
    for model, tried in VALID_NDCG[name].items():
        entry = results.half_lives[model]
        assert (entry["half_life_events"], entry["chosen_by"]) == ("inf", "config")
        assert {h: round(v, 4) for h, v in entry["valid_ndcg@10"].items()} == {"inf": tried["inf"]}
        assert round(results.metrics["valid"][model]["ndcg@10"], 4) == tried["inf"]


def test_the_prepared_dataset_gives_the_in_memory_figures(log, tmp_path):
    """Through the prepared dataset, as trainer.main reads the log (its incoming events
    come from the incoming partitions), every baseline figure is the in-memory one."""
    name, prepared = log
    on_disk = prepare(DataConfig(path=f"embedded:{name}", partitions=3), out_dir=tmp_path)
    config = BaselineConfig(recency_half_life_events=1.0)
    expected = baseline_results(prepared, config, EvalConfig())
    assert baseline_results(on_disk, config, EvalConfig()) == expected
    if on_disk.log.shared_id_space:
        # With the file rows in the incoming partitions' events, the two-way rule reads them there.
        incoming_log = PreparedDataset.open(tmp_path).read_events(list(range(3)), "incoming")
        assert "row" in incoming_log.columns
        with_rows = dataclasses.replace(on_disk, incoming_log=incoming_log)
        assert baseline_results(with_rows, config, EvalConfig()) == expected


def test_a_fixed_half_life_ranks_no_validation_for_test_figures_alone(log):
    name, prepared = log
    results = baseline_results(prepared, BaselineConfig(recency_half_life_events=5.0), EvalConfig(), splits=("test",))
    assert list(results.metrics) == ["test"]
    for model in VALID_NDCG[name]:
        assert results.half_lives[model] == {"half_life_events": 5.0, "chosen_by": "config", "valid_ndcg@10": {}}
    assert "recency_frequency 5 (set in the config)" in results.note()
