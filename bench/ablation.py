"""What each part of the method buys: the default config against one change at a time,
on both embedded logs, under ../shared/BENCHMARK.md's protocol (test split).

    .venv/bin/python bench/ablation.py                          # every variant, 3 seeds
    .venv/bin/python bench/ablation.py --seeds 1 --data collegemsg --variants default,no_film
    .venv/bin/python bench/ablation.py --seeds 1 train.max_epochs=1   # a shorter schedule
    .venv/bin/python bench/ablation.py --logged-only    # tables from the runs logged so far

With --logged-only nothing is trained: a variant whose seeds are not all in the run log
is listed under "missing" instead (how a benchmark spread over sessions reports midway).

Writes bench/results/ablation.json as {"seeds", "overrides", "results": {dataset: {variant:
{"overrides": [...], "runs", metric: {"mean", "std"}, "delta_ndcg@10", "compared_with"}}}} and
bench/results/ablation.md, plus {"missing": {dataset: [variant, ...]}} with --logged-only.
Runs are kept in bench/results/runs.jsonl (bench/runs.py
RunLog), so an interrupted ablation resumes.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, write_result  # noqa: E402
from bench.runs import DATASETS, RUN_LOG_PATH, RunLog, mean_std, quality_arguments  # noqa: E402
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
    # Not a part of the method: what bf16 towers (train.precision) cost in quality, and buy in time.
    "bf16": ["train.precision=bf16"],
}

# What a variant is compared with (Δ NDCG@10), when not the default.
COMPARED_WITH = {"transformer_no_projection": "transformer"}

# Variants that change nothing on some logs: ml-100k has separate actor and target IDs,
# so it has no incoming events to turn off.
SKIP = {"ml-100k": {"no_incoming"}}


def run_variants(
    data: str, variants: list[str], seeds: list[int], overrides: list[str], missing: list[str] | None = None
) -> dict:
    """Train what the run log lacks (the default variant is the quality benchmark's
    default run), then aggregate each variant over seeds. Given a `missing` list, train
    nothing: variants without all their seeds logged are appended to it instead."""
    run_log = RunLog(RUN_LOG_PATH)
    config_path = CONFIG_DIR / f"{data}.yaml"
    out: dict[str, dict] = {}
    for name in variants:
        if name in SKIP.get(data, ()):
            continue
        variant_overrides = [*overrides, *VARIANTS[name]]
        if missing is not None:
            records = [run_log.logged(data, name, seed, config_path, variant_overrides) for seed in seeds]
            if any(record is None for record in records):
                missing.append(name)
                continue
        else:
            records = [run_log.run(data, name, seed, config_path, variant_overrides) for seed in seeds]
        runs = [record["test"] for record in records]
        for seed, run in zip(seeds, runs):
            logging.getLogger("ablation").warning("%s %s seed %d: ndcg@10 %.4f", data, name, seed, run["ndcg@10"])
        out[name] = {"overrides": VARIANTS[name], "runs": len(runs)}
        out[name].update({metric: mean_std([r[metric] for r in runs]) for metric in METRICS})
    for name, result in out.items():
        base = COMPARED_WITH.get(name, "default")
        if base in out:
            result["compared_with"] = base
            result["delta_ndcg@10"] = result["ndcg@10"]["mean"] - out[base]["ndcg@10"]["mean"]
    return out


def markdown(results: dict, seeds: int, overrides: list[str], missing: dict[str, list[str]] | None = None) -> str:
    lines = []
    for data, variants in results.items():
        extra = f", overrides {' '.join(overrides)}" if overrides else ""
        lines += [
            f"**{data}** (test split, mean ± std over {seeds} seed(s){extra})",
            "",
            "| variant | change | " + " | ".join(METRICS) + " | Δ NDCG@10 | against |",
            "|---|---|" + "---:|" * (len(METRICS) + 1) + "---|",
        ]
        for name, result in variants.items():
            cells = [f"{result[m]['mean']:.4f} ± {result[m]['std']:.4f}" for m in METRICS]
            delta = result.get("delta_ndcg@10")
            change = " ".join(result["overrides"]) or "-"
            against = result.get("compared_with", "") if name != "default" else ""
            lines.append(
                f"| {name} | {change} | " + " | ".join(cells) + f" | {'' if delta is None else f'{delta:+.4f}'} | {against} |"
            )
        if missing and missing.get(data):
            lines += ["", f"Not yet run at this code and seed count: {', '.join(missing[data])}."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = quality_arguments(__doc__)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ",".join(VARIANTS))
    parser.add_argument("--logged-only", action="store_true", help="train nothing: tables from the runs logged so far")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    logging.basicConfig(level=logging.WARNING, force=True)
    datasets = args.data or DATASETS
    missing: dict[str, list[str]] | None = {data: [] for data in datasets} if args.logged_only else None
    results = {
        data: run_variants(data, variants, list(range(args.seeds)), args.overrides, None if missing is None else missing[data])
        for data in datasets
    }
    table = markdown(results, args.seeds, args.overrides, missing)
    summary = {"seeds": args.seeds, "overrides": args.overrides, "results": results}
    if missing is not None:
        summary["missing"] = missing
    path = write_result("ablation", summary)
    (RESULTS_DIR / "ablation.md").write_text(table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
