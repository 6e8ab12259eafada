"""The benchmarks' run log: a run is found again only under the same identity, and the
ablation can report midway (--logged-only) without training anything."""

from __future__ import annotations

import json

import pytest

import bench.ablation as ablation
import bench.quality as quality
import bench.runs as runs
from trainer.evaluation import METRIC_NAMES
from trainer.main import CONFIG_DIR

METRICS = {"ndcg@10": 0.5, "hr@10": 0.6, "hr@1": 0.3, "hr@50": 0.7, "mrr": 0.4, "mean_rank": 50.0}


def _record(data: str, model: str, seed: int, overrides: list[str], ndcg: float, config: str | None = None) -> dict:
    config = config or f"{data}.yaml"
    return {
        "data": data, "model": model, "seed": seed, "overrides": overrides,
        "code": runs.code_version(data, CONFIG_DIR / config, overrides),
        "config": config, "config_sha": runs.config_hash(CONFIG_DIR / config),
        "test": {**METRICS, "ndcg@10": ndcg}, "seconds": 100.0 + seed,
        "evaluated_actors": 1077, "candidates": 1862,
        "baselines": {b: dict(METRICS) for b in runs.BASELINES},
        "machine": {"cpu": "Intel Xeon", "platform": "Linux"},
    }


@pytest.fixture
def run_log(tmp_path, monkeypatch):
    path = tmp_path / "runs.jsonl"
    monkeypatch.setattr(ablation, "RUN_LOG_PATH", path)
    monkeypatch.setattr(quality, "RUN_LOG_PATH", path)

    def no_training(*args, **kwargs):
        raise AssertionError("a --logged-only report must not train")

    monkeypatch.setattr(runs, "train_and_test", no_training)
    return path


def test_a_logged_run_is_found_only_under_its_own_identity(run_log):
    record = _record("collegemsg", "no_film", 0, ["model.film=false"], 0.5)
    run_log.write_text(json.dumps(record) + "\n" + json.dumps({**record, "code": "an older code version"}) + "\n")
    log = runs.RunLog(run_log)
    config = CONFIG_DIR / "collegemsg.yaml"
    assert log.logged("collegemsg", "no_film", 0, config, ["model.film=false"]) == record
    assert log.logged("collegemsg", "no_film", 1, config, ["model.film=false"]) is None
    assert log.logged("collegemsg", "no_film", 0, config, []) is None
    assert log.logged("collegemsg", "no_film", 0, CONFIG_DIR / "ml-100k.yaml", ["model.film=false"]) is None


def test_a_new_version_of_a_setting_retires_only_the_runs_that_turn_it_on(run_log):
    """Random negatives changed (their logQ correction): their runs are retired, the
    default's stand."""
    config = CONFIG_DIR / "collegemsg.yaml"
    default = _record("collegemsg", "default", 0, [], 0.5)
    # Logged before the change: its code has no part version for random negatives.
    old_random = {**_record("collegemsg", "rand_negs_4", 0, ["loader.num_rand_negs=4"], 0.5), "code": default["code"]}
    run_log.write_text(json.dumps(default) + "\n" + json.dumps(old_random) + "\n")
    log = runs.RunLog(run_log)
    assert log.logged("collegemsg", "default", 0, config, []) == default
    assert log.logged("collegemsg", "rand_negs_4", 0, config, ["loader.num_rand_negs=4"]) is None
    assert runs.code_version("collegemsg", config, ["loader.num_rand_negs=0"]) == runs.code_version(
        "collegemsg", config, []
    )
    current = {**old_random, "code": runs.code_version("collegemsg", config, ["loader.num_rand_negs=4"])}
    run_log.write_text(json.dumps(current) + "\n")
    assert log.logged("collegemsg", "rand_negs_4", 0, config, ["loader.num_rand_negs=4"]) == current


def _parts(data: str, config: str, overrides: list[str]) -> set[str]:
    """The part versions a run's code version carries, after CODE_VERSION."""
    version = runs.code_version(data, CONFIG_DIR / config, overrides)
    assert version.startswith(runs.CODE_VERSION)
    return set(version.split("; ")[1:])


def test_the_merged_contact_stream_retires_only_the_runs_it_changes():
    """Only shared-ID logs' runs with the re-scorer reading incoming contacts compute it:
    ml-100k, the SASRec-style model (no re-scorer) and the variants without incoming
    contacts are bitwise what they were and do not carry its version."""
    merged = next(v for v in runs.PART_VERSIONS if "merged two-way stream" in v)
    assert merged in _parts("collegemsg", "collegemsg.yaml", [])
    for overrides in (["model.merged_contact_stream=false"], ["model.incoming_window=0"], ["model.repeat_scoring=false"]):
        assert merged not in _parts("collegemsg", "collegemsg.yaml", overrides)
    assert merged not in _parts("collegemsg", "collegemsg-sasrec.yaml", [])
    assert merged not in _parts("ml-100k", "ml-100k.yaml", [])


def test_the_contact_offset_default_retires_only_the_runs_that_now_choose_one():
    """Turning the offset on by default changed the test figure of every run with the
    re-scorer and the option not set off, on any log (ml-100k chooses too); the SASRec-style
    model, the variant without the re-scorer and a run with the offset set off are what
    they were."""
    offset = next(v for v in runs.PART_VERSIONS if "contact offset" in v)
    for data, config in (("collegemsg", "collegemsg.yaml"), ("ml-100k", "ml-100k.yaml")):
        assert offset in _parts(data, config, [])
        assert offset in _parts(data, config, ["model.repeat_explore=true"])
        assert offset not in _parts(data, config, ["model.contact_offset_on_validation=false"])
        assert offset not in _parts(data, config, ["model.repeat_scoring=false"])
        assert _parts(data, config, ["model.repeat_scoring=false"]) == set()
    assert _parts("collegemsg", "collegemsg-sasrec.yaml", []) == set()


def test_a_config_is_identified_by_its_values_not_its_comments(tmp_path):
    shipped = (CONFIG_DIR / "ml-100k.yaml").read_text()
    commented = tmp_path / "commented.yaml"
    commented.write_text("# a corrected comment\n" + shipped.replace("\n\n", "\n"))
    changed = tmp_path / "changed.yaml"
    changed.write_text(shipped.replace("patience: 3", "patience: 4"))
    assert changed.read_text() != shipped  # the edit took
    assert runs.config_hash(commented) == runs.config_hash(CONFIG_DIR / "ml-100k.yaml")
    assert runs.config_hash(changed) != runs.config_hash(CONFIG_DIR / "ml-100k.yaml")


def test_logged_only_reports_the_seeds_logged_so_far_with_paired_deltas(run_log):
    records = [
        _record("collegemsg", "default", 0, [], 0.60),
        _record("collegemsg", "default", 1, [], 0.62),
        _record("collegemsg", "no_film", 0, ["model.film=false"], 0.55),  # seed 1 not run yet
    ]
    run_log.write_text("".join(json.dumps(r) + "\n" for r in records))
    missing: list[str] = []
    results = ablation.run_variants("collegemsg", ["default", "no_film", "no_rab"], [0, 1], [], missing)
    assert list(results) == ["default", "no_film"]
    assert results["default"]["ndcg@10"]["mean"] == pytest.approx(0.61)
    assert (results["no_film"]["runs"], results["no_film"]["seeds"]) == (1, [0])
    # Paired with the default's seed 0 (0.60), not its two-seed mean (0.61).
    assert results["no_film"]["delta_ndcg@10"] == pytest.approx(-0.05)
    assert results["no_film"]["delta_seeds"] == 1
    assert missing == ["no_rab"]
    table = ablation.markdown({"collegemsg": results}, 2, [], {"collegemsg": missing})
    assert "| no_film | model.film=false | 0.5500 (1) | -0.0500 |" in table
    assert "Not yet run at this code: no_rab." in table


def test_a_delta_pairs_only_seeds_one_cpu_ran_on_both_sides(run_log):
    """Another CPU rounds differently from the first step on: a variant run there is not
    compared with a default run here, and the table says why its Δ is missing."""
    def on(cpu: str, record: dict) -> dict:
        return {**record, "machine": {"cpu": cpu, "platform": "Linux"}}

    records = [
        on("Intel Xeon", _record("collegemsg", "default", 0, [], 0.60)),
        on("Intel Xeon", _record("collegemsg", "default", 1, [], 0.62)),
        on("Intel Xeon", _record("collegemsg", "no_film", 0, ["model.film=false"], 0.55)),
        on("AMD EPYC", _record("collegemsg", "no_film", 1, ["model.film=false"], 0.70)),
        on("AMD EPYC", _record("collegemsg", "no_rab", 0, ["model.relative_attention_bias=false"], 0.65)),
        # Logged before records named their CPU: it may have run anywhere.
        {k: v for k, v in _record("collegemsg", "hard_negatives", 1, ["loss.hard_negatives.enabled=true"], 0.5).items()
         if k != "machine"},
    ]
    run_log.write_text("".join(json.dumps(r) + "\n" for r in records))
    variants = ["default", "no_film", "no_rab", "hard_negatives"]
    results = ablation.run_variants("collegemsg", variants, [0, 1], [], [])
    # no_film: seed 0 pairs (Intel on both sides), seed 1 does not (AMD against Intel).
    assert results["no_film"]["delta_ndcg@10"] == pytest.approx(-0.05)
    assert results["no_film"]["delta_seeds"] == 1
    assert results["no_film"]["unpaired_other_cpu"] == [1]
    assert results["no_film"]["cpus"] == ["AMD EPYC", "Intel Xeon"] and results["default"]["cpus"] == ["Intel Xeon"]
    assert "delta_ndcg@10" not in results["no_rab"] and results["no_rab"]["unpaired_other_cpu"] == [0]
    assert "delta_ndcg@10" not in results["hard_negatives"]
    assert results["hard_negatives"]["unpaired_cpu_unrecorded"] == [1] and results["hard_negatives"]["cpus"] == ["unrecorded"]
    table = ablation.markdown({"collegemsg": results}, 2, [], {"collegemsg": []})
    # A Δ over 1 of the 2 seeds both have says so.
    assert "| no_film | model.film=false | 0.6250 ± 0.0750 (2) | -0.0500 (1/2) |" in table
    assert "| no_rab | model.relative_attention_bias=false | 0.6500 (1) | other CPU |" in table
    assert "| hard_negatives | loss.hard_negatives.enabled=true | 0.5000 (1) | CPU unrecorded |" in table


def test_a_log_left_out_of_data_is_reported_from_the_run_log_not_trained(run_log, monkeypatch):
    records = [
        _record("ml-100k", "default", 0, [], 0.11),
        _record("collegemsg", "default", 0, [], 0.60),
        _record("collegemsg", "no_film", 0, ["model.film=false"], 0.55),
    ]
    run_log.write_text("".join(json.dumps(r) + "\n" for r in records))
    written = {}
    machine_written = {}

    def write_result(name: str, summary: dict, with_machine: bool = True) -> None:
        written[name], machine_written[name] = summary, with_machine

    monkeypatch.setattr(ablation, "write_result", write_result)
    monkeypatch.setattr(ablation, "RESULTS_DIR", run_log.parent)
    arguments = ["ablation.py", "--seeds", "1", "--variants", "default,no_film", "--data"]
    # ml-100k's no_film is not logged: training collegemsg must leave it missing, not train it.
    monkeypatch.setattr("sys.argv", [*arguments, "collegemsg"])
    ablation.main()
    summary = written["ablation"]
    assert summary["trained"] == ["collegemsg"]
    assert summary["results"]["ml-100k"]["default"]["ndcg@10"]["mean"] == pytest.approx(0.11)
    assert summary["missing"] == {"ml-100k": ["no_film"]}
    assert "Not yet run at this code: no_film." in (run_log.parent / "ablation.md").read_text()
    # Its runs may come from several machines (logged ones reused, a log not trained):
    # the file names none, each variant names its CPUs.
    assert machine_written["ablation"] is False
    assert summary["results"]["ml-100k"]["default"]["cpus"] == ["Intel Xeon"]
    # Asked for, it is trained.
    monkeypatch.setattr("sys.argv", [*arguments, "ml-100k"])
    with pytest.raises(AssertionError, match="must not train"):
        ablation.main()


HALF_LIFE = {"half_life_events": 1.0, "chosen_by": "valid ndcg@10", "valid_ndcg@10": {"1": 0.5, "inf": 0.4}}


def _baseline_figures(data: str, overrides: list[str]) -> tuple[dict, dict]:
    """What quality.baseline_figures returns, without reading a log (the real figures are
    tests/integration/test_reference_figures.py's)."""
    counts = {"evaluated_actors": {"mean": 1077.0, "std": 0.0}, "candidates": {"mean": 1862.0, "std": 0.0}}
    figures = {name: {"mean": value, "std": 0.0} for name, value in METRICS.items()}
    models = runs.BASELINES if data == "collegemsg" else runs.BASELINES[:2]  # two-way: shared ID space only
    rules = [m for m in models if m.endswith("recency_frequency")]
    return {m: {**figures, **counts} for m in models}, {m: dict(HALF_LIFE) for m in rules}


def _quality_main(run_log, monkeypatch, *arguments: str) -> tuple[dict, str]:
    written = {}
    def write_result(name: str, result: dict, with_machine: bool = True) -> None:
        # quality.json has a fixed schema; its runs may come from several machines, so
        # quality_meta.json lists each figure's CPUs instead of naming one.
        assert not with_machine
        written[name] = result

    monkeypatch.setattr(quality, "write_result", write_result)
    monkeypatch.setattr(quality, "RESULTS_DIR", run_log.parent)
    monkeypatch.setattr(quality, "baseline_figures", _baseline_figures)
    monkeypatch.setattr("sys.argv", ["quality.py", *arguments])
    quality.main()
    assert written["quality_meta"]["baseline_half_lives"]["collegemsg"]["two_way_recency_frequency"] == HALF_LIFE
    for data, models in written["quality_meta"]["seeds"].items():
        assert set(written["quality_meta"]["cpus"][data]) == set(models)
    return written["quality"], (run_log.parent / "quality.md").read_text()


def test_a_quality_subset_run_never_turns_a_three_seed_figure_into_a_one_seed_one(run_log, monkeypatch):
    records = [_record("collegemsg", "default", seed, [], 0.60 + 0.01 * seed) for seed in range(3)]
    records.append(_record("collegemsg", "sasrec", 0, [], 0.38, config="collegemsg-sasrec.yaml"))
    run_log.write_text("".join(json.dumps(r) + "\n" for r in records))
    results, table = _quality_main(run_log, monkeypatch, "--data", "collegemsg", "--seeds", "1")
    # {dataset: {model: {name: {"mean", "std"}}}}, nothing else at any level (run_seconds
    # also has its "max").
    assert list(results) == ["collegemsg"]
    assert set(results["collegemsg"]) == {"default", "sasrec", *runs.BASELINES}
    counts = {"evaluated_actors", "candidates"}
    for name, model in results["collegemsg"].items():
        trained = name in ("default", "sasrec")
        assert set(model) == {*METRIC_NAMES, *counts, *(["run_seconds"] if trained else [])}
        assert all(set(v) == ({"mean", "std", "max"} if k == "run_seconds" else {"mean", "std"}) for k, v in model.items())
    assert results["collegemsg"]["default"]["ndcg@10"]["mean"] == pytest.approx(0.61)  # all 3 seeds
    assert results["collegemsg"]["default"]["run_seconds"]["max"] == 102.0
    assert "| CollegeMsg | default (HSTU + contact re-scoring) | 3 |" in table
    assert "| CollegeMsg | SASRec-style (causal transformer, same loss) | 1 |" in table
    assert "CollegeMsg: ndcg@10 0.6100 >= 0.476" in table
    # Each recency-frequency row names the half-life validation chose.
    assert "| CollegeMsg | two-way recency-frequency (h = 1) | - | 0.3000 |" in table
    assert "| CollegeMsg | recency-frequency (h = 1) | - |" in table


def test_baselines_only_trains_nothing_and_keeps_the_models_logged_figures(run_log, monkeypatch):
    records = [_record("collegemsg", "default", seed, [], 0.60 + 0.01 * seed) for seed in range(3)]
    records.append(_record("ml-100k", "default", 0, [], 0.11, config="ml-100k.yaml"))
    run_log.write_text("".join(json.dumps(r) + "\n" for r in records))
    # Training would raise (the run_log fixture); sasrec is not logged and is not trained.
    results, table = _quality_main(run_log, monkeypatch, "--baselines-only")
    assert list(results) == ["collegemsg", "ml-100k"]
    assert results["collegemsg"]["default"]["ndcg@10"]["mean"] == pytest.approx(0.61)
    assert results["ml-100k"]["default"]["ndcg@10"]["mean"] == pytest.approx(0.11)
    assert "sasrec" not in results["collegemsg"]
    assert "two_way_recency_frequency" in results["collegemsg"]
    assert "two_way_recency_frequency" not in results["ml-100k"]
    assert "| ml-100k | two-way" not in table


def test_baselines_only_refuses_to_drop_a_model_quality_json_shows(run_log, monkeypatch):
    run_log.write_text(json.dumps(_record("collegemsg", "default", 0, [], 0.60)) + "\n")
    shown = {"collegemsg": {"default": {}, "sasrec": {}, "most_popular": {}}}
    (run_log.parent / "quality.json").write_text(json.dumps(shown))
    with pytest.raises(SystemExit, match="collegemsg/sasrec"):
        _quality_main(run_log, monkeypatch, "--baselines-only", "--data", "collegemsg")


def test_the_bar_is_not_judged_on_fewer_than_three_seeds(run_log, monkeypatch):
    run_log.write_text(json.dumps(_record("collegemsg", "default", 0, [], 0.60)) + "\n")
    _, table = _quality_main(run_log, monkeypatch, "--data", "collegemsg", "--seeds", "1", "--models", "default")
    assert "CollegeMsg: bar not judged, 1 seed(s) logged of the 3 it takes" in table
    assert ">= 0.476 (mean of" not in table


def test_a_new_run_records_the_cpu_it_ran_on(run_log, monkeypatch):
    """Figures move with the CPU's rounding, so each run says which CPU it ran on."""
    from bench.common import cpu_model

    results = {
        "metrics": {"test": {"model": dict(METRICS), **{b: dict(METRICS) for b in runs.BASELINES}},
                    "valid": {"model": dict(METRICS)}},
        "training": {"steps": 10, "best_step": 10}, "data": {"evaluated_actors": 1077, "candidates": 1862},
    }
    monkeypatch.setattr(runs, "train_and_test", lambda config, overrides, seed: (results, 1.0))
    record = runs.RunLog(run_log).run("collegemsg", "default", 0, CONFIG_DIR / "collegemsg.yaml", [])
    assert record["machine"]["cpu"] == cpu_model() and cpu_model()
    assert json.loads(run_log.read_text().splitlines()[-1])["machine"] == record["machine"]


def test_a_run_with_a_contact_offset_logs_the_one_validation_chose(tmp_path, monkeypatch):
    metrics = {**METRICS}
    results = {
        "metrics": {"test": {"model": metrics, **{b: metrics for b in runs.BASELINES}}, "valid": {"model": metrics}},
        "training": {"steps": 10, "best_step": 5}, "data": {"evaluated_actors": 3, "candidates": 4},
        "contact_offset": {"chosen": 2.0, "valid_ndcg@10": {"0.0": 0.1, "2.0": 0.2}},
    }
    monkeypatch.setattr(runs, "train_and_test", lambda *args: (results, 1.0))
    overrides = ["model.contact_offset_on_validation=true"]
    record = runs.RunLog(tmp_path / "runs.jsonl").run("collegemsg", "contact_offset", 0, CONFIG_DIR / "collegemsg.yaml", overrides)
    assert record["contact_offset"] == 2.0
    assert json.loads((tmp_path / "runs.jsonl").read_text())["contact_offset"] == 2.0


def test_a_delta_pairs_the_runs_of_a_cpu_that_ran_both_sides_whichever_was_logged_first(run_log):
    """The default was logged on one CPU, a variant and the default again on another: the
    Δ pairs the second CPU's runs, not the first record of each side."""
    def on(cpu: str, record: dict) -> dict:
        return {**record, "machine": {"cpu": cpu, "platform": "Linux"}}

    records = [
        on("Intel Xeon", _record("collegemsg", "default", 0, [], 0.60)),
        on("AMD EPYC", _record("collegemsg", "no_film", 0, ["model.film=false"], 0.70)),
        on("AMD EPYC", _record("collegemsg", "default", 0, [], 0.66)),
    ]
    run_log.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = CONFIG_DIR / "collegemsg.yaml"
    log = runs.RunLog(run_log)
    assert log.logged("collegemsg", "default", 0, config, [])["test"]["ndcg@10"] == 0.60  # the first logged
    assert log.logged("collegemsg", "default", 0, config, [], cpu="AMD EPYC")["test"]["ndcg@10"] == 0.66
    assert log.logged("collegemsg", "default", 0, config, [], cpu="Other") is None
    results = ablation.run_variants("collegemsg", ["default", "no_film"], [0], [], [])
    assert results["no_film"]["delta_ndcg@10"] == pytest.approx(0.04)
    assert results["no_film"]["delta_cpus"] == ["AMD EPYC"] and "unpaired_other_cpu" not in results["no_film"]
    assert results["default"]["cpus"] == ["Intel Xeon"]  # its reported run is still the first logged


def test_on_this_cpu_trains_a_variants_baseline_here_when_another_cpu_ran_it(run_log, monkeypatch):
    from bench.common import cpu_model

    run_log.write_text(json.dumps({**_record("collegemsg", "default", 0, [], 0.60),
                                   "machine": {"cpu": "Some other CPU", "platform": "Linux"}}) + "\n")
    trained = []
    ndcg = {"": 0.66, "model.film=false": 0.70}

    def training(config_path, overrides, seed):
        trained.append(list(overrides))
        test = {**METRICS, "ndcg@10": ndcg[" ".join(overrides)]}
        results = {"metrics": {"test": {"model": test, **{b: dict(METRICS) for b in runs.BASELINES}},
                               "valid": {"model": test}},
                   "training": {"steps": 10, "best_step": 10}, "data": {"evaluated_actors": 1077, "candidates": 1862}}
        return results, 1.0

    monkeypatch.setattr(runs, "train_and_test", training)
    results = ablation.run_variants("collegemsg", ["no_film"], [0], [], on_this_cpu=True)
    assert trained == [[], ["model.film=false"]]  # the default first, here, then the variant
    assert results["default"]["cpus"] == [cpu_model()] and results["no_film"]["cpus"] == [cpu_model()]
    assert results["no_film"]["delta_ndcg@10"] == pytest.approx(0.04)
    # Run again: both are logged on this CPU now, nothing is trained.
    trained.clear()
    ablation.run_variants("collegemsg", ["no_film"], [0], [], on_this_cpu=True)
    assert trained == []


def test_on_this_cpu_trains_no_baseline_for_a_variant_that_changes_nothing_on_the_log(run_log, monkeypatch):
    """ml-100k has separate IDs: no_contact_activity is skipped there, so its default is
    not trained here for a comparison that will not be made."""
    def training(*args, **kwargs):
        raise AssertionError("nothing to train: the only variant asked for is skipped on this log")

    monkeypatch.setattr(runs, "train_and_test", training)
    assert ablation.run_variants("ml-100k", ["no_contact_activity"], [0], [], on_this_cpu=True) == {}
