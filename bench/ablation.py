"""What each part of the method buys: the default config against one change at a time,
on both embedded logs, under ../shared/BENCHMARK.md's protocol (test split).

    .venv/bin/python bench/ablation.py                          # every variant, 3 seeds
    .venv/bin/python bench/ablation.py --seeds 1 --data collegemsg --variants default,no_film
    .venv/bin/python bench/ablation.py --seeds 1 train.max_epochs=1   # a shorter schedule
    .venv/bin/python bench/ablation.py --logged-only    # tables from the runs logged so far
    .venv/bin/python bench/ablation.py --on-this-cpu --data collegemsg --variants no_contact_activity

With --logged-only nothing is trained, and a log left out of --data is not trained either:
their variants are reported over the seeds the run log has so far (seed counts shown), those
with none listed under "missing" (how a benchmark spread over sessions reports midway). Δ
NDCG@10 is paired over the seeds both runs have on one CPU ("other CPU" where none is;
"(k/n)" after a Δ over k of the n seeds both have). On a machine whose CPU did not run the
logged baseline, --on-this-cpu trains each variant and its baseline here (where the log has
no run of this CPU) and reports them from this CPU's runs; the log then holds runs of both
CPUs, and a Δ pairs the runs of whichever CPU ran both sides.

Writes bench/results/ablation.json as {"seeds", "overrides", "trained", "results": {dataset:
{variant: {"overrides": [...], "runs", "seeds", metric: {"mean", "std"}, "delta_ndcg@10",
"delta_seeds", "paired_of" (the seeds both have), "compared_with", "cpus" (those its reported
runs ran on), "per_seed_delta" (by seed), "delta_cpus" (those the Δ's pairs ran on), "unpaired_other_cpu" / "unpaired_cpu_unrecorded" (seeds left out of Δ: the baseline's
run is from another CPU, or one of the two records no CPU)}}}} and bench/results/ablation.md (both logs side by side,
then one table per log), plus {"missing": {dataset: [variant, ...]}} for logs not trained.
Runs are kept in bench/results/runs.jsonl (bench/runs.py
RunLog), so an interrupted ablation resumes.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, write_result  # noqa: E402
from bench.runs import (  # noqa: E402
    DATASETS, RUN_LOG_PATH, RunLog, delta_of_pairs, format_mean_std, mean_std, paired_runs, parse_choices,
    quality_arguments, record_cpu,
)
from trainer.main import CONFIG_DIR  # noqa: E402

METRICS = ("ndcg@10", "hr@10", "hr@1", "mrr")

# One change to the default at a time. The transformer must be causal for the temporal
# pretraining loss the default trains with.
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "transformer": ["model.encoder=transformer", "model.causal=true"],
    "swiglu": ["model.activation=swiglu"],
    # The 2D -> D history projection exists only in the transformer's query tower.
    "transformer_no_projection": ["model.encoder=transformer", "model.causal=true", "model.history_projection=false"],
    "no_temporal": ["loss.temporal_weight=0"],
    # The temporal weight held constant instead of decayed to 0 over the run.
    "constant_temporal_weight": ["loss.temporal_decay=none"],
    "rand_negs_4": ["loader.num_rand_negs=4"],
    "rand_negs_32": ["loader.num_rand_negs=32"],
    "no_logq": ["loss.logq_correction=false"],
    "hard_negatives": ["loss.hard_negatives.enabled=true"],
    "no_film": ["model.film=false"],
    # Off by default (configs/schema.py ModelConfig.time_features says why): the variant turns them on.
    "time_features": ["model.time_features=true"],
    "no_rab": ["model.relative_attention_bias=false"],
    "no_repeat_scoring": ["model.repeat_scoring=false"],
    "no_incoming": ["model.incoming_window=0"],
    # Issue 22 §1: without the contacts' features over both directions merged in time order.
    "no_merged_contact_stream": ["model.merged_contact_stream=false"],
    # Off by default: the re-scorer also reads the actor's idle time (bench/contact_ceiling.py
    # found it the one query-side input that lifts a ranker over the contacts).
    "actor_idle": ["model.actor_idle_feature=true"],
    # On by default since 2026-12-05: one offset on every contact's score, chosen on
    # validation after training; the variant turns it off.
    "no_contact_offset": ["model.contact_offset_on_validation=false"],
    # Off by default: a contact's order learned among the contacts alone, its balance
    # against new candidates by one propensity per query (models/repeat.py), with the
    # default's contact offset.
    "repeat_explore": ["model.repeat_explore=true"],
    # On by default since 2026-12-05: the re-scorer also reads each contact's own recent
    # activity with anyone (data/activity.py), looked up across ranks; the variant turns it off.
    "no_contact_activity": ["model.contact_activity=false"],
    # Issue 22 §4: the parts that had no row yet.
    "streaming_logq": ["loss.logq_estimator=streaming"],
    "mask_history": ["loss.mask_history=true"],
    # A cosine never exceeds 1: nothing is masked.
    "no_similarity_mask": ["loss.similarity_mask_threshold=2"],
    # The active pool is where random negatives are drawn: on only with them (Δ against rand_negs_4).
    "active_pool": ["loader.num_rand_negs=4", "data.active_since_fraction=0.5"],
    "temperature_0.05": ["loss.temperature=0.05"],
    "temperature_0.2": ["loss.temperature=0.2"],
    # The learning rates (issue 22 §1: every ml-100k seed's best model was its last step).
    "lr_3e-3": ["optim.lr=3e-3"],
    "sparse_lr_0.02": ["optim.sparse_lr=0.02"],
    "sparse_lr_0.1": ["optim.sparse_lr=0.1"],
    # The default before 2026-12-04: constant temporal weight, ID tables at 0.02.
    "previous_default": ["loss.temporal_decay=none", "optim.sparse_lr=0.02"],
    # Not a part of the method: what bf16 towers (train.precision) cost in quality, and buy in time.
    "bf16": ["train.precision=bf16"],
}

# What a variant is compared with (Δ NDCG@10), when not the default.
COMPARED_WITH = {"transformer_no_projection": "transformer", "active_pool": "rand_negs_4"}

# Variants that change nothing on some logs: ml-100k has separate actor and target IDs,
# so it has no incoming events to turn off.
SKIP = {"ml-100k": {"no_incoming", "no_merged_contact_stream", "no_contact_activity"}}


def run_variants(
    data: str, variants: list[str], seeds: list[int], overrides: list[str], missing: list[str] | None = None,
    on_this_cpu: bool = False,
) -> dict:
    """Train what the run log lacks (the default variant is the quality benchmark's
    default run), then aggregate each variant over seeds. Given a `missing` list, train
    nothing: a variant is reported over the seeds logged so far, and one with none of
    them is appended to `missing`. Δ NDCG@10 is paired: the mean, over the seeds both
    runs have on one CPU, of variant minus baseline, so a midway report (or one whose
    runs span machines) compares like with like. With `on_this_cpu` every variant, and
    the baseline it is compared with, is reported from runs of this machine's CPU,
    trained here when the log has none (the log holds runs of several CPUs)."""
    run_log = RunLog(RUN_LOG_PATH)
    config_path = CONFIG_DIR / f"{data}.yaml"
    if on_this_cpu and missing is None:  # each variant's baseline too, or nothing here pairs with it
        compared = [name for name in variants if name not in SKIP.get(data, ())]
        variants = list(dict.fromkeys([COMPARED_WITH.get(name, "default") for name in compared] + variants))
    out: dict[str, dict] = {}
    cpu_by_seed: dict[str, dict[int, str | None]] = {}
    by_cpu: dict[str, dict[int, dict[str, dict]]] = {}
    for name in variants:
        if name in SKIP.get(data, ()):
            continue
        variant_overrides = [*overrides, *VARIANTS[name]]
        if missing is not None:
            logged = {seed: run_log.logged(data, name, seed, config_path, variant_overrides) for seed in seeds}
            records = {seed: record for seed, record in logged.items() if record is not None}
            if not records:
                missing.append(name)
                continue
        else:
            records = {
                seed: run_log.run(data, name, seed, config_path, variant_overrides, on_this_cpu) for seed in seeds
            }
        tests = {seed: record["test"] for seed, record in records.items()}
        for seed, test in tests.items():
            logging.getLogger("ablation").warning("%s %s seed %d: ndcg@10 %.4f", data, name, seed, test["ndcg@10"])
        cpu_by_seed[name] = {seed: record_cpu(record) for seed, record in records.items()}
        by_cpu[name] = run_log.logged_by_cpu(data, name, config_path, variant_overrides)
        out[name] = {"overrides": VARIANTS[name], "runs": len(tests), "seeds": list(tests)}
        out[name]["cpus"] = sorted({cpu or "unrecorded" for cpu in cpu_by_seed[name].values()})
        out[name].update({metric: mean_std([test[metric] for test in tests.values()]) for metric in METRICS})
    for name, result in out.items():
        base = COMPARED_WITH.get(name, "default")
        both = [seed for seed in cpu_by_seed[name] if seed in cpu_by_seed.get(base, {})]
        # A run logged before records named their CPU pairs with nothing: it may have run anywhere.
        pairs = paired_runs(by_cpu[name], by_cpu.get(base, {}), cpu_by_seed[name])
        pairs = {seed: pair for seed, pair in pairs.items() if seed in both}
        common = list(pairs)
        unrecorded = [
            seed for seed in both if seed not in pairs and None in (cpu_by_seed[name][seed], cpu_by_seed[base][seed])
        ]
        other_cpu = [seed for seed in both if seed not in pairs and seed not in unrecorded]
        if other_cpu:
            result["unpaired_other_cpu"] = other_cpu
        if unrecorded:
            result["unpaired_cpu_unrecorded"] = unrecorded
        result["paired_of"] = len(both)
        if common:
            result["compared_with"] = base
            result.update(delta_of_pairs(pairs))
    return out


def _ndcg_cell(result: dict) -> str:
    return f"{format_mean_std(result['ndcg@10'], result['runs'])} ({result['runs']})"


def _delta_cell(name: str, result: dict | None) -> str:
    # The default's Δ against itself is blank, as is a variant with no baseline seeds; one
    # whose seeds could not be paired says why, and a Δ over only some of the seeds both
    # have says over how many.
    if name == "default" or result is None:
        return ""
    if "delta_ndcg@10" not in result:
        if result.get("unpaired_other_cpu"):
            return "other CPU"
        return "CPU unrecorded" if result.get("unpaired_cpu_unrecorded") else ""
    delta = f"{result['delta_ndcg@10']:+.4f}"
    return delta if result["delta_seeds"] == result["paired_of"] else f"{delta} ({result['delta_seeds']}/{result['paired_of']})"


def overview(results: dict) -> list[str]:
    """One row per variant, NDCG@10 and its paired Δ on every log side by side (the
    README's table); seed counts in parentheses."""
    names = list(dict.fromkeys(name for variants in results.values() for name in variants))
    lines = [
        "| variant | change | " + " | ".join(f"{data} NDCG@10 (seeds) | Δ" for data in results) + " |",
        "|---|---|" + "---:|---:|" * len(results),
    ]
    for name in names:
        cells = []
        for variants in results.values():
            result = variants.get(name)
            cells += ["-" if result is None else _ndcg_cell(result), _delta_cell(name, result)]
        change = " ".join(VARIANTS[name]) or "-"
        lines.append(f"| {name} | {change} | " + " | ".join(cells) + " |")
    against = sorted({f"{name} against {base}" for name, base in COMPARED_WITH.items() if name in names})
    lines += ["", "Δ: paired mean over the seeds both runs have on one CPU, against the default" + (f" ({', '.join(against)})" if against else "") + "."]
    return lines


def markdown(results: dict, seeds: int, overrides: list[str], missing: dict[str, list[str]] | None = None) -> str:
    extra = f", overrides {' '.join(overrides)}" if overrides else ""
    lines = [f"**NDCG@10 on the test split, mean ± std over up to {seeds} seed(s){extra}**", "", *overview(results), ""]
    for data, variants in results.items():
        lines += [
            f"**{data}** (test split, mean ± std over the seeds run, of {seeds}{extra})",
            "",
            "| variant | change | seeds | " + " | ".join(METRICS) + " | Δ NDCG@10 | against |",
            "|---|---|---:|" + "---:|" * (len(METRICS) + 1) + "---|",
        ]
        for name, result in variants.items():
            cells = [format_mean_std(result[m], result["runs"]) for m in METRICS]
            change = " ".join(result["overrides"]) or "-"
            against = result.get("compared_with", "") if name != "default" else ""
            lines.append(
                f"| {name} | {change} | {result['runs']} | " + " | ".join(cells) + f" | {_delta_cell(name, result)} | {against} |"
            )
        if missing and missing.get(data):
            lines += ["", f"Not yet run at this code: {', '.join(missing[data])}."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = quality_arguments(__doc__)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ",".join(VARIANTS))
    parser.add_argument("--logged-only", action="store_true", help="train nothing: tables from the runs logged so far")
    parser.add_argument(
        "--on-this-cpu", action="store_true",
        help="report each variant and its baseline from runs of this CPU, training them here where the log has none",
    )
    args = parser.parse_args()
    variants = parse_choices(parser, args.variants, VARIANTS, "variant(s)")
    logging.basicConfig(level=logging.WARNING, force=True)
    # The logs not asked for are reported from the run log, never trained, so the
    # results file always covers both logs however a long ablation was split up.
    to_train = set() if args.logged_only else set(args.data or DATASETS)
    missing: dict[str, list[str]] = {data: [] for data in DATASETS if data not in to_train}
    results = {
        data: run_variants(
            data, variants, list(range(args.seeds)), args.overrides, missing.get(data), args.on_this_cpu and not args.logged_only
        )
        for data in DATASETS
    }
    table = markdown(results, args.seeds, args.overrides, missing)
    summary = {"seeds": args.seeds, "overrides": args.overrides, "results": results, "trained": sorted(to_train)}
    if missing:
        summary["missing"] = missing
    # No machine for the file: its runs may come from several (logged runs are reused, and
    # the logs not trained are reported from the run log); each variant names its "cpus".
    path = write_result("ablation", summary, with_machine=False)
    (RESULTS_DIR / "ablation.md").write_text(table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
