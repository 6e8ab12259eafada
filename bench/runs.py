"""Training runs for the quality benchmarks: one config, one seed, in a scratch directory,
and the run log that lets a long benchmark resume where it stopped."""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

from bench.common import cpu_model
from configs.loading import load_config
from configs.schema import ExperimentConfig
from trainer.build import reads_activity, reads_incoming
from trainer.main import run

DATASETS = ("collegemsg", "ml-100k")
# Every benchmark training run, whichever benchmark asked for it: the quality benchmark's
# default runs are the ablation's "default" variant too.
RUN_LOG_PATH = Path(__file__).resolve().parent / "results" / "runs.jsonl"
# The baselines a run's results carry (trainer.results.baseline_results); the two-way rule
# only on logs whose actors and targets are one ID space. bench/quality.py computes its
# baseline figures afresh; a record keeps its run's for reference.
BASELINES = ("most_popular", "recency_frequency", "two_way_recency_frequency")
# Part of every run's identity: bump it with a code change that changes results, so the
# runs logged before it are retired (kept in the log, no longer matched).
CODE_VERSION = "2026-12-04 temporal weight decayed linearly and ID tables' learning rate 0.05 by default"
# Logs whose actors and targets are one ID space (the two-way rule and incoming contacts),
# bench/generalisation.py's logs derived from CollegeMsg included.
SHARED_ID_LOGS = frozenset({"collegemsg", "collegemsg-first-contact", "collegemsg-late"})
# A change that alters only the runs using one part retires only those: a run whose
# resolved config (config file, then overrides) uses the part carries the part's version
# after CODE_VERSION. Every other run is bitwise what it was and stands.
PART_VERSIONS: dict[str, Callable[[str, ExperimentConfig], bool]] = {
    "2026-12-02 in-batch and random negatives corrected by their mixture's count":
        lambda data, config: config.loader.num_rand_negs > 0,
    "2026-12-02 contact features over the merged two-way stream": lambda data, config: (
        config.model.merged_contact_stream and reads_incoming(config, data in SHARED_ID_LOGS)
    ),
    # The option was already there; what changed is that the config files' runs take it by
    # default, so a run logged before under the same overrides tested without it.
    "2026-12-05 contact offset chosen on validation by default": lambda data, config: (
        config.model.repeat_scoring and config.model.contact_offset_on_validation
    ),
    # As the offset: the option is new and on by default, so the runs that read it changed.
    "2026-12-05 contacts' own activity read by default": lambda data, config: (
        reads_activity(config, data in SHARED_ID_LOGS)
    ),
}


def code_version(data: str, config_path: Path, overrides: list[str]) -> str:
    """CODE_VERSION, and the version of every part the run's config uses."""
    config = load_config(config_path, overrides)
    return "; ".join([CODE_VERSION] + [v for v, uses in PART_VERSIONS.items() if uses(data, config)])


def train_and_test(config_path: Path, overrides: list[str], seed: int) -> tuple[dict, float]:
    """Train, validate, test one config; (results as trainer.main writes them, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(config_path, [f"seed={seed}", f"output_dir={tmp}", *overrides])
        start = time.perf_counter()
        results = run(config)
        return results, time.perf_counter() - start


class RunLog:
    """One JSON line per finished run, appended as soon as the run ends, so a benchmark of
    hours that is interrupted (or spread over several sessions) loses at most the run in
    progress. A run is identified by data set, model (or variant), seed, overrides and a
    hash of the config file's values: changing a value in a shipped config retires its
    earlier runs (editing its comments does not), and so does a new CODE_VERSION, or a new
    version of a part the run's resolved config uses (PART_VERSIONS; records carry theirs
    as `code`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def _matching(self, data: str, model: str, config_path: Path, overrides: list[str]) -> list[dict]:
        """The records of this run, any seed, at this config and the current code."""
        key = (data, model, config_hash(config_path), overrides, code_version(data, config_path, overrides))
        return [
            record for record in self.records()
            if (record["data"], record["model"], record.get("config_sha"), record["overrides"], record.get("code")) == key
        ]

    def logged(
        self, data: str, model: str, seed: int, config_path: Path, overrides: list[str], cpu: str | None = None
    ) -> dict | None:
        """The logged record of this run at the current config file and code (the first
        logged; with `cpu`, the first that CPU ran), or None."""
        return next(
            (r for r in self._matching(data, model, config_path, overrides) if r["seed"] == seed and (cpu is None or record_cpu(r) == cpu)),
            None,
        )

    def logged_by_cpu(self, data: str, model: str, config_path: Path, overrides: list[str]) -> dict[int, dict[str, dict]]:
        """{seed: {CPU: the first record that CPU ran}} of this run at the current config
        and code; records that name no CPU are left out (they pair with nothing)."""
        by_seed: dict[int, dict[str, dict]] = {}
        for record in self._matching(data, model, config_path, overrides):
            if record_cpu(record) is not None:
                by_seed.setdefault(record["seed"], {}).setdefault(record_cpu(record), record)
        return by_seed

    def logged_seeds(
        self, data: str, model: str, config_path: Path, overrides: list[str], cpu: str | None = None
    ) -> list[dict]:
        """The logged record of every seed of this run at the current config file and code,
        by seed (one read of the log); with `cpu`, only the records that CPU ran."""
        by_seed = {}
        for record in self._matching(data, model, config_path, overrides):
            if cpu is None or record_cpu(record) == cpu:
                by_seed.setdefault(record["seed"], record)  # the first, as logged() takes
        return [by_seed[seed] for seed in sorted(by_seed)]

    def run(
        self, data: str, model: str, seed: int, config_path: Path, overrides: list[str], on_this_cpu: bool = False
    ) -> dict:
        """The logged record of this run, training it first if it is not there yet.
        `overrides` identify the run; they are applied after the config file. With
        `on_this_cpu`, a record another CPU ran does not count: a Δ pairs the runs of one
        CPU (bench/ablation.py), so a variant trained here needs its baseline run here."""
        record = self.logged(data, model, seed, config_path, overrides, cpu_model() if on_this_cpu else None)
        if record is not None:
            return record
        results, run_seconds = train_and_test(config_path, overrides, seed)
        test = results["metrics"]["test"]
        record = {
            "data": data, "model": model, "seed": seed, "overrides": overrides, "code": code_version(data, config_path, overrides),
            "config": config_path.name, "config_sha": config_hash(config_path), "seconds": run_seconds,
            "steps": results["training"]["steps"], "best_step": results["training"]["best_step"],
            "valid": results["metrics"]["valid"]["model"],
            "test": test["model"], "baselines": {b: test[b] for b in BASELINES if b in test},
            "evaluated_actors": results["data"]["evaluated_actors"], "candidates": results["data"]["candidates"],
            # Which CPU: its rounding moves figures (CollegeMsg seeds by up to 0.008), so
            # deltas should pair runs of one machine (records before this field lack it).
            "machine": {"cpu": cpu_model(), "platform": platform.platform()},
        }
        if "contact_offset" in results:  # model.contact_offset_on_validation: what validation chose
            record["contact_offset"] = results["contact_offset"]["chosen"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record


def paired_runs(
    variant: dict[int, dict[str, dict]], base: dict[int, dict[str, dict]], reported_cpu: dict[int, str | None]
) -> dict[int, tuple[dict, dict]]:
    """{seed: (variant's record, base's record)} over the seeds one CPU ran on both sides
    (`RunLog.logged_by_cpu` of each): another CPU rounds differently from the first step on
    (CollegeMsg, measured 2026-12-05: the same training on an AMD EPYC and on an Intel Xeon
    ended up to 0.0017 apart in validation NDCG@10, one of 5 at another best step), the
    size of many Δ. The pair is of the CPU of the variant's reported run (`reported_cpu`)
    when both sides have a run there, else of any CPU both have."""
    pairs = {}
    for seed, runs_of_cpu in variant.items():
        shared = sorted((cpu for cpu in runs_of_cpu if cpu in base.get(seed, {})), key=lambda cpu: cpu != reported_cpu.get(seed))
        if shared:
            pairs[seed] = (runs_of_cpu[shared[0]], base[seed][shared[0]])
    return pairs


def delta_of_pairs(pairs: dict[int, tuple[dict, dict]]) -> dict:
    """What `paired_runs`' pairs say: the mean Δ test NDCG@10 (variant minus base), over
    how many seeds, each seed's Δ (by seed) and the CPUs that ran them; {} when none pairs."""
    if not pairs:
        return {}
    deltas = [pairs[s][0]["test"]["ndcg@10"] - pairs[s][1]["test"]["ndcg@10"] for s in sorted(pairs)]
    return {"delta_ndcg@10": sum(deltas) / len(deltas), "delta_seeds": len(deltas), "per_seed_delta": deltas,
            "delta_cpus": sorted({record_cpu(pair[0]) for pair in pairs.values()})}


def record_cpu(record: dict) -> str | None:
    """The CPU a logged run ran on (None for records from before runs named it)."""
    return record.get("machine", {}).get("cpu")


def config_hash(path: Path) -> str:
    """Hash of what the config file sets, not of its text: comments, blank lines and key
    order don't change a run, so correcting a config's comment keeps its logged runs."""
    values = yaml.safe_load(path.read_text()) or {}
    # default=str: YAML dates and the like have no JSON form.
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def format_mean_std(stat: dict, runs: int, decimals: int = 4) -> str:
    """'m ± s' for a table cell; one run has no spread to show: a '± 0.0000' would read
    as a measured one."""
    mean = f"{stat['mean']:.{decimals}f}"
    return mean if runs == 1 else f"{mean} ± {stat['std']:.{decimals}f}"


def parse_choices(parser: argparse.ArgumentParser, text: str, choices, what: str) -> list[str]:
    """A comma-separated list of names, each one of `choices`; a parser error otherwise."""
    names = text.split(",")
    unknown = [name for name in names if name not in choices]
    if unknown:
        parser.error(f"unknown {what} {unknown}; choose from {', '.join(choices)}")
    return names


def quality_arguments(description: str | None) -> argparse.ArgumentParser:
    """The options every quality benchmark takes: which logs, how many seeds, overrides."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=DATASETS, action="append", help="data set(s) to run (default: both)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every run")
    return parser
