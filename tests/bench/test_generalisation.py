"""bench/generalisation.py: the derived logs hold exactly the events their kind says, in
the base file's own format, and the table reports the model against the best baseline."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from bench.generalisation import (
    DERIVED_LOGS, aggregate, first_contact, late_half, liked, markdown, run_overrides, write_derived,
)
from bench.runs import PART_VERSIONS, code_version, config_hash
from configs.loading import load_config
from data.prepare import resolve_data_path
from data.readers import read_log
from trainer.main import CONFIG_DIR


def _events(rows: list[tuple[int, str, str, float, float]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=["line", "actor", "target", "timestamp", "action"], orient="row")


def test_first_contact_keeps_each_pairs_earliest_event_ties_by_file_order():
    events = _events([
        (1, "a", "b", 5.0, 0.0),   # a later a->b: dropped
        (2, "a", "b", 3.0, 0.0),   # the earliest a->b, though not the first line
        (3, "b", "a", 9.0, 0.0),   # the reverse direction is another pair
        (4, "c", "d", 7.0, 0.0),   # c->d tie at 7: the earlier line wins
        (5, "c", "d", 7.0, 0.0),
    ])
    assert sorted(first_contact(events).to_list()) == [2, 3, 4]


def test_late_half_keeps_the_median_timestamp_and_later():
    events = _events([(i, "a", "b", t, 0.0) for i, t in enumerate([4.0, 1.0, 3.0, 2.0, 3.0], 1)])
    assert sorted(late_half(events).to_list()) == [1, 3, 5]


def test_liked_keeps_ratings_of_four_and_five():
    events = _events([(i, "u", "m", 0.0, r) for i, r in enumerate([1.0, 4.0, 3.5, 5.0], 1)])
    assert sorted(liked(events).to_list()) == [2, 4]


def _read(path: Path, base: str) -> pl.DataFrame:
    config = load_config(CONFIG_DIR / f"{base}.yaml", [f"data.path={path}"])
    return read_log(path, config.data).frame.collect()


def test_the_first_contact_log_is_every_pair_of_collegemsg_once_in_its_format(tmp_path):
    path = write_derived("collegemsg-first-contact", root=tmp_path)
    config = load_config(CONFIG_DIR / "collegemsg.yaml", [])
    base = read_log(resolve_data_path(config.data.path), config.data).frame.collect()
    derived = _read(path, "collegemsg")
    assert derived.height == base.select("actor", "target").unique().height
    assert derived.select("actor", "target").is_duplicated().sum() == 0
    # Every kept event is its pair's earliest in the base log.
    earliest = base.with_columns(pl.col("timestamp").cast(pl.Int64)).group_by("actor", "target").agg(pl.col("timestamp").min())
    joined = derived.with_columns(pl.col("timestamp").cast(pl.Int64)).join(earliest, on=["actor", "target"], suffix="_min")
    assert (joined["timestamp"] == joined["timestamp_min"]).all()


def test_a_derived_log_keeps_the_base_files_header_and_lines(tmp_path):
    path = write_derived("ml-100k-liked", root=tmp_path)
    source = Path(resolve_data_path(load_config(CONFIG_DIR / "ml-100k.yaml", []).data.path))
    base_lines, lines = source.read_text().splitlines(), path.read_text().splitlines()
    assert lines[0] == base_lines[0]  # the header, as published
    assert set(lines) <= set(base_lines) and len(lines) == 1 + sum(
        float(line.split("\t")[2]) >= 4 for line in base_lines[1:]
    )
    derived = _read(path, "ml-100k")
    assert derived["action"].cast(pl.Float64).min() >= 4


def test_a_derived_log_is_rewritten_only_when_stale_and_never_read_from_a_partial_file(tmp_path):
    partial = tmp_path / "runs" / "derived" / "collegemsg-late.txt.partial"
    partial.parent.mkdir(parents=True)
    partial.write_text("1 2 3\n")  # a crash's leftover: not the log
    path = write_derived("collegemsg-late", root=tmp_path)
    assert path.name == "collegemsg-late.txt" and path.stat().st_size > 100_000
    text, before = path.read_text(), path.stat().st_mtime_ns
    assert write_derived("collegemsg-late", root=tmp_path) == path and path.stat().st_mtime_ns == before
    path.write_text(text.replace("\n", "\n1 2 3\n", 1))  # edited by hand, or left by an older derivation
    write_derived("collegemsg-late", root=tmp_path)
    assert path.read_text() == text


@pytest.mark.parametrize("name", ["collegemsg-first-contact", "collegemsg-late"])
def test_runs_on_a_log_derived_from_collegemsg_carry_the_contact_features_version(name):
    """The run log retires a shared-ID-space run when its contact features change: a log
    derived from CollegeMsg is one."""
    version = code_version(name, CONFIG_DIR / "collegemsg.yaml", run_overrides(name))
    contact_part = next(v for v in PART_VERSIONS if "contact features" in v)
    assert contact_part in version


def _record(seed: int, ndcg: float) -> dict:
    metrics = {"ndcg@10": ndcg, "hr@10": ndcg + 0.1, "hr@1": ndcg - 0.1, "mrr": ndcg}
    baselines = {"most_popular": {**metrics, "ndcg@10": 0.02}, "two_way_recency_frequency": {**metrics, "ndcg@10": 0.40},
                 "recency_frequency": {**metrics, "ndcg@10": 0.01}}
    return {"seed": seed, "test": metrics, "baselines": baselines, "best_step": 100, "steps": 200,
            "evaluated_actors": 10, "candidates": 20}


def test_the_table_compares_the_model_with_the_best_baseline():
    result = aggregate([_record(0, 0.42), _record(1, 0.44)])
    assert result["best_baseline"] == "two_way_recency_frequency"
    assert result["model_over_best_baseline"] == pytest.approx(0.43 / 0.40 - 1)
    table = markdown({"collegemsg-first-contact": {"default": result}})
    row = next(line for line in table.splitlines() if line.startswith("| collegemsg-first-contact"))
    assert "| default | 2 |" in row
    assert "0.4300 ± 0.0100" in row and "| 0.4000 |" in row and row.endswith("+7.5% |")
    assert set(DERIVED_LOGS) == {"collegemsg-first-contact", "collegemsg-late", "ml-100k-liked"}


def test_a_variants_delta_pairs_the_default_runs_of_its_own_cpu(tmp_path):
    """The default's first logged run is of another CPU: the Δ pairs the default run this
    CPU also made, seed by seed, and the table lists it."""
    import json

    from bench.generalisation import paired_delta
    from bench.runs import RunLog

    name, config = "collegemsg-late", CONFIG_DIR / "collegemsg.yaml"
    default, variant = run_overrides(name), run_overrides(name) + ["model.contact_activity=true"]

    def logged(model: str, overrides: list[str], seed: int, ndcg: float, cpu: str) -> dict:
        return {**_record(seed, ndcg), "data": name, "model": model, "overrides": overrides,
                "code": code_version(name, config, overrides), "config_sha": config_hash(config),
                "machine": {"cpu": cpu, "platform": "Linux"}}

    records = [logged("default", default, 0, 0.50, "Xeon"), logged("default", default, 0, 0.60, "EPYC"),
               logged("default", default, 1, 0.62, "EPYC"), logged("contact_activity", variant, 0, 0.63, "EPYC"),
               logged("contact_activity", variant, 1, 0.61, "EPYC")]
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    run_log = RunLog(path)
    reported = run_log.logged_seeds(name, "contact_activity", config, variant)
    delta = paired_delta(run_log, name, "contact_activity", config, variant, default, reported)
    assert delta["per_seed_delta"] == pytest.approx([0.03, -0.01]) and delta["delta_ndcg@10"] == pytest.approx(0.01)
    assert delta["delta_seeds"] == 2 and delta["delta_cpus"] == ["EPYC"]
    table = markdown({name: {"contact_activity": {**aggregate(reported), **delta}}})
    assert f"- {name}, contact_activity: +0.0100 over 2 seed(s) (+0.0300, -0.0100; EPYC)" in table
    # The default's row, as --on-this-cpu reports it: this CPU's runs, not the first logged.
    assert [r["test"]["ndcg@10"] for r in run_log.logged_seeds(name, "default", config, default)] == [0.50, 0.62]
    assert [r["test"]["ndcg@10"] for r in run_log.logged_seeds(name, "default", config, default, "EPYC")] == [0.60, 0.62]
    assert run_log.logged_seeds(name, "default", config, default, "another CPU") == []
    # Nothing pairs with a default of another CPU only.
    path.write_text(json.dumps(records[0]) + "\n" + json.dumps(records[3]) + "\n")
    assert paired_delta(RunLog(path), name, "contact_activity", config, variant, default, reported) == {}
