"""Does the default hold on logs it was not tuned on? Logs of other kinds derived from the
embedded ones, trained with the base log's shipped config (only its data path changed),
3 seeds, against every baseline, under ../shared/BENCHMARK.md's protocol.

    .venv/bin/python bench/generalisation.py                 # every derived log, 3 seeds (~35 min)
    .venv/bin/python bench/generalisation.py --logs collegemsg-first-contact --seeds 1
    .venv/bin/python bench/generalisation.py --logged-only   # the table from the runs logged so far
    .venv/bin/python bench/generalisation.py --variants no_contact_activity --on-this-cpu   # a variant (bench/ablation.py), paired

Why: quality is judged on public logs of other kinds (messaging, e-mail, trust, edits,
ratings, purchases) that no one here sees, and every default was chosen on CollegeMsg and
ml-100k. A derived log is not independent of its base, but each removes the regime a
default could have been fitted to:
- `collegemsg-first-contact`: each ordered pair's first message only, as a trust or follow
  log records a relation once. No target ever repeats, so what the re-scorer reads of the
  actor's own contacts is worthless; only reciprocity (the people who wrote first) is left.
- `collegemsg-late`: the events at or after CollegeMsg's median timestamp (half the
  events, days 36-194 of its 194): the same community after its launch burst.
- `ml-100k-liked`: ml-100k's ratings of 4 and 5 only, the implicit positive feedback a
  purchase or like log holds (the rating stays the action).

Each derived log keeps its base file's format and lines (header and comments included),
so it is read exactly as a user's file would be. The logs are written under
runs/derived/ (rebuilt whenever missing or stale); runs go through the run log
(bench/results/runs.jsonl, shared with bench/quality.py and bench/ablation.py), so the
benchmark resumes. Writes bench/results/generalisation.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ablation import SKIP, VARIANTS  # noqa: E402
from bench.common import RESULTS_DIR, cpu_model, write_result  # noqa: E402
from bench.runs import (  # noqa: E402
    BASELINES, RUN_LOG_PATH, RunLog, delta_of_pairs, format_mean_std, mean_std, paired_runs, parse_choices, record_cpu,
)
from configs.loading import load_config  # noqa: E402
from configs.schema import DataConfig  # noqa: E402
from data.prepare import resolve_data_path  # noqa: E402
from data.readers import read_log  # noqa: E402
from trainer.main import CONFIG_DIR  # noqa: E402

DERIVED_DIR = Path("runs") / "derived"  # relative to the repository root: part of each run's identity
METRICS = ("ndcg@10", "hr@10", "hr@1", "mrr")


def first_contact(events: pl.DataFrame) -> pl.Series:
    """Lines of each ordered (actor, target) pair's first event in time, ties by file
    order."""
    first = events.sort(["timestamp", "line"]).unique(["actor", "target"], keep="first")
    return first["line"]


def late_half(events: pl.DataFrame) -> pl.Series:
    """Lines of the events at or after the median timestamp."""
    return events.filter(pl.col("timestamp") >= pl.col("timestamp").median())["line"]


def liked(events: pl.DataFrame) -> pl.Series:
    """Lines of the events whose action (a rating) is 4 or more."""
    return events.filter(pl.col("action") >= 4)["line"]


@dataclass(frozen=True)
class DerivedLog:
    base: str  # the shipped config (configs/<base>.yaml) and its log
    keep: Callable[[pl.DataFrame], pl.Series]
    kind: str  # what it stands for, in the table


DERIVED_LOGS: dict[str, DerivedLog] = {
    "collegemsg-first-contact": DerivedLog("collegemsg", first_contact, "trust / follow: each pair once, no repeats"),
    "collegemsg-late": DerivedLog("collegemsg", late_half, "messaging, a later period"),
    "ml-100k-liked": DerivedLog("ml-100k", liked, "likes / purchases: ratings of 4 and 5"),
}


def _base_and_path(name: str) -> tuple[Path, Path, DataConfig]:
    """(the base log's file, the derived log's path relative to the repository root, the
    base config's data settings)."""
    config = load_config(CONFIG_DIR / f"{DERIVED_LOGS[name].base}.yaml", [])
    source = Path(resolve_data_path(config.data.path))
    return source, DERIVED_DIR / f"{name}{source.suffix}", config.data


def write_derived(name: str, root: Path = ROOT) -> Path:
    """Write the derived log `name` from its base file: the base's lines kept whole, in
    file order, every non-event line (header, comments) included. Derived afresh on every
    call and rewritten only when the file differs, so a stale or edited file is never
    trained on. Its path is part of each run's identity (the run log): a change to a
    derivation must come with a new name, or the runs logged before it would still match."""
    source, relative, data_config = _base_and_path(name)
    target = root / relative
    frame = read_log(source, data_config).frame.collect()
    numeric = [c for c in ("timestamp", "action") if c in frame.columns]
    events = frame.with_columns(pl.col(c).cast(pl.Float64) for c in numeric)
    kept = set(DERIVED_LOGS[name].keep(events).to_list())
    event_lines = set(frame["line"].to_list())
    lines = source.read_text().splitlines(keepends=True)
    text = "".join(line for number, line in enumerate(lines, 1) if number in kept or number not in event_lines)
    if target.exists() and target.read_text() == text:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(text)
    partial.replace(target)  # a crash never leaves a half-written log that the next run would trust
    return target


def run_overrides(name: str) -> list[str]:
    return [f"data.path={_base_and_path(name)[1]}"]


def aggregate(records: list[dict]) -> dict:
    """The model's mean and spread over seeds; the baselines, deterministic, from the first
    record; the model against the best baseline (by test NDCG@10), as a ratio."""
    out = {"seeds": [r["seed"] for r in records], "runs": len(records)}
    out["model"] = {m: mean_std([r["test"][m] for r in records]) for m in METRICS}
    out["baselines"] = {b: {m: records[0]["baselines"][b][m] for m in METRICS}
                        for b in BASELINES if b in records[0]["baselines"]}
    best = max(out["baselines"], key=lambda b: out["baselines"][b]["ndcg@10"])
    out["best_baseline"] = best
    out["model_over_best_baseline"] = out["model"]["ndcg@10"]["mean"] / out["baselines"][best]["ndcg@10"] - 1.0
    out["per_seed_ndcg@10"] = [r["test"]["ndcg@10"] for r in records]
    out["best_step_of_steps"] = [[r["best_step"], r["steps"]] for r in records]
    out["evaluated_actors"] = records[0]["evaluated_actors"]
    out["candidates"] = records[0]["candidates"]
    return out


def markdown(results: dict) -> str:
    """One row per log and variant: `results` is {log: {variant: aggregate(...)}}."""
    lines = [
        "| log | kind | variant | seeds | model NDCG@10 | model HR@10 | two-way rule | recency-frequency | most popular "
        "| model / best baseline |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, variants in results.items():
        for variant, r in variants.items():
            base = r["baselines"]
            cells = [f"{base[b]['ndcg@10']:.4f}" if b in base else "-"
                     for b in ("two_way_recency_frequency", "recency_frequency", "most_popular")]
            lines.append(
                f"| {name} | {DERIVED_LOGS[name].kind} | {variant} | {r['runs']} | "
                f"{format_mean_std(r['model']['ndcg@10'], r['runs'])} | {format_mean_std(r['model']['hr@10'], r['runs'])} | "
                + " | ".join(cells) + f" | {r['model_over_best_baseline']:+.1%} |"
            )
    lines += ["", "Test NDCG@10 (HR@10 for the model too); baselines: one deterministic figure each, the "
              "recency-frequency half-lives chosen on validation; the last column: the model's mean over the "
              "best baseline's figure, minus 1."]
    paired = [(name, variant, r) for name, variants in results.items() for variant, r in variants.items()
              if "delta_ndcg@10" in r]
    if paired:
        lines += ["", "Paired Δ NDCG@10 against the default, over the seeds one CPU ran on both sides:", ""]
        lines += [f"- {name}, {variant}: {r['delta_ndcg@10']:+.4f} over {r['delta_seeds']} seed(s) "
                  f"({', '.join(f'{d:+.4f}' for d in r['per_seed_delta'])}; {', '.join(r['delta_cpus'])})"
                  for name, variant, r in paired]
    return "\n".join(lines) + "\n"


def paired_delta(run_log: RunLog, name: str, variant: str, config_path: Path, overrides: list[str],
                 default_overrides: list[str], reported: list[dict]) -> dict:
    """The variant's Δ NDCG@10 against the default, paired per seed over one CPU's runs
    (bench/runs.py paired_runs); {} when no seed pairs."""
    return delta_of_pairs(paired_runs(
        run_log.logged_by_cpu(name, variant, config_path, overrides),
        run_log.logged_by_cpu(name, "default", config_path, default_overrides),
        {r["seed"]: record_cpu(r) for r in reported},
    ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logs", default=",".join(DERIVED_LOGS), help="comma-separated subset of: " + ",".join(DERIVED_LOGS))
    parser.add_argument("--variants", default="default", help="comma-separated, of bench/ablation.py's: " + ",".join(VARIANTS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--logged-only", action="store_true", help="train nothing: the table from the runs logged so far")
    parser.add_argument(
        "--on-this-cpu", action="store_true",
        help="train each variant, and the default it is compared with, on this CPU where the log has no run of it",
    )
    args = parser.parse_args()
    names = parse_choices(parser, args.logs, DERIVED_LOGS, "log(s)")
    variants = parse_choices(parser, args.variants, VARIANTS, "variant(s)")
    logging.basicConfig(level=logging.WARNING, force=True)
    os.chdir(ROOT)  # the runs name their logs relative to the repository root
    run_log = RunLog(RUN_LOG_PATH)
    results = {}
    # Every log and variant with logged runs is in the table; only those asked for are trained.
    for name in DERIVED_LOGS:
        config_path = CONFIG_DIR / f"{DERIVED_LOGS[name].base}.yaml"
        trains = name in names and not args.logged_only
        if trains:
            write_derived(name)
        for variant, variant_overrides in VARIANTS.items():
            if variant in SKIP.get(DERIVED_LOGS[name].base, ()):  # nothing to change on this log
                continue
            overrides = run_overrides(name) + variant_overrides
            # With --on-this-cpu the default is trained here too, first, for any variant asked for.
            compared = [v for v in variants if v != "default" and v not in SKIP.get(DERIVED_LOGS[name].base, ())]
            asked = variant in variants or (args.on_this_cpu and variant == "default" and bool(compared))
            if trains and asked:
                for seed in range(args.seeds):
                    record = run_log.run(name, variant, seed, config_path, overrides, args.on_this_cpu)
                    logging.getLogger("generalisation").warning(
                        "%s %s seed %d: ndcg@10 %.4f", name, variant, seed, record["test"]["ndcg@10"]
                    )
            # What --on-this-cpu trained is reported from this CPU's runs, as its Δ pairs them.
            cpu = cpu_model() if trains and asked and args.on_this_cpu else None
            records = run_log.logged_seeds(name, variant, config_path, overrides, cpu)
            if records:
                results.setdefault(name, {})[variant] = aggregate(records)
                if variant != "default":
                    results[name][variant].update(
                        paired_delta(run_log, name, variant, config_path, overrides, run_overrides(name), records)
                    )
    table = markdown(results)
    path = write_result("generalisation", {"results": results})
    (RESULTS_DIR / "generalisation.md").write_text(table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
