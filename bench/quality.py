"""Quality on the embedded logs: the default model, the SASRec-style baseline and the two
simple baselines, 3 seeds each, under ../shared/BENCHMARK.md's protocol.

    .venv/bin/python bench/quality.py                       # both logs, 3 seeds
    .venv/bin/python bench/quality.py --data collegemsg --seeds 1

Writes bench/results/quality.json as exactly {dataset: {model: {name: {"mean", "std"}}}}:
the metrics, plus `evaluated_actors`, `candidates` and `run_seconds` (which also has
"max": the issue's budget is per run), and bench/results/quality.md, the table the
README shows. bench/results/quality_meta.json has the seeds behind each figure and the
machine. Each finished run is kept in bench/results/runs.jsonl (shared with
bench/ablation.py): a rerun skips the runs already there (bench.runs.RunLog says what
identifies a run). A figure is over every seed the run log holds for it, so a subset run
(`--data collegemsg --seeds 1`) trains only what it asks for and never turns a 3-seed
figure into a 1-seed one; a log not asked for is reported from the run log, never trained.
The bar is judged only on 3 or more seeds.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, write_result  # noqa: E402
from bench.runs import (  # noqa: E402
    BASELINES, DATASETS, RUN_LOG_PATH, RunLog, format_mean_std, mean_std, quality_arguments,
)
from trainer.evaluation import METRIC_NAMES  # noqa: E402
from trainer.main import CONFIG_DIR  # noqa: E402

MODELS = {"default": "{data}.yaml", "sasrec": "{data}-sasrec.yaml"}
LABELS = {
    "default": "default (HSTU + contact re-scoring)",
    "sasrec": "SASRec-style (causal transformer, same loss)",
    "recency_frequency": "recency-frequency",
    "most_popular": "most popular",
}
LOG_NAMES = {"collegemsg": "CollegeMsg", "ml-100k": "ml-100k"}
# The bar of the trainer issue: mean of 3 seeds, default config, test split.
BAR = {"collegemsg": {"ndcg@10": 0.476, "hr@10": 0.578}, "ml-100k": {"ndcg@10": 0.058, "hr@10": 0.125}}
BAR_SEEDS = 3


def run_dataset(run_log: RunLog, data: str, seeds: list[int], models: list[str], overrides: list[str]) -> None:
    """Train the runs of these seeds that the run log lacks."""
    for model in models:
        for seed in seeds:
            run_log.run(data, model, seed, CONFIG_DIR / MODELS[model].format(data=data), overrides)


def aggregate(records: dict[str, list[dict]]) -> dict:
    """{model: {name: {"mean", "std"}}} over the records of each model (at least one)."""
    out: dict = {}
    first = next(iter(records.values()))[0]
    counts = {
        "evaluated_actors": mean_std([first["evaluated_actors"]]),
        "candidates": mean_std([first["candidates"]]),
    }
    for model, runs in records.items():
        out[model] = {metric: mean_std([r["test"][metric] for r in runs]) for metric in METRIC_NAMES}
        out[model].update(counts)
        seconds = [r["seconds"] for r in runs]
        out[model]["run_seconds"] = {**mean_std(seconds), "max": max(seconds)}
    # The baselines are deterministic: the same in every run.
    for baseline in BASELINES:
        out[baseline] = {metric: mean_std([first["baselines"][baseline][metric]]) for metric in METRIC_NAMES}
        out[baseline].update(counts)
    return out


def report(run_log: RunLog, overrides: list[str]) -> tuple[dict, dict]:
    """(quality.json's results, {dataset: {model: seeds}}) from what the run log holds."""
    results, seeds = {}, {}
    for data in DATASETS:
        records = {
            model: run_log.logged_seeds(data, model, CONFIG_DIR / config.format(data=data), overrides)
            for model, config in MODELS.items()
        }
        records = {model: runs for model, runs in records.items() if runs}
        if records:
            results[data] = aggregate(records)
            seeds[data] = {model: [r["seed"] for r in runs] for model, runs in records.items()}
    return results, seeds


def markdown(results: dict, seeds: dict) -> str:
    """One table, both logs (the README's), then the bar where it can be judged."""
    metric_names = {"mean_rank": "mean rank"}
    lines = [
        "| log | model | seeds | " + " | ".join(metric_names.get(m, m.upper()) for m in METRIC_NAMES)
        + " | slowest run s |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in METRIC_NAMES) + " | ---: |",
    ]
    verdicts = []
    for data, models in results.items():
        for model in (*MODELS, "recency_frequency", "most_popular"):
            if model not in models:
                continue
            stats, trained = models[model], model in MODELS
            runs = len(seeds[data][model]) if trained else 1  # a baseline: one deterministic figure
            cells = [format_mean_std(stats[m], runs, 1 if m == "mean_rank" else 4) for m in METRIC_NAMES]
            if model == "default":
                cells[METRIC_NAMES.index("ndcg@10")] = f"**{cells[METRIC_NAMES.index('ndcg@10')]}**"
            cells.append(f"{stats['run_seconds']['max']:.0f}" if trained else "-")
            seed_count = str(runs) if trained else "-"
            lines.append(f"| {LOG_NAMES[data]} | {LABELS[model]} | {seed_count} | " + " | ".join(cells) + " |")
        if "default" in models and data in BAR:
            runs = len(seeds[data]["default"])
            default = models["default"]
            checks = "; ".join(
                f"{metric} {default[metric]['mean']:.4f} {'>=' if default[metric]['mean'] >= bar else '<'} {bar}"
                for metric, bar in BAR[data].items()
            )
            if runs >= BAR_SEEDS:
                slowest = default["run_seconds"]["max"]
                verdicts.append(f"{LOG_NAMES[data]}: {checks} (mean of {runs} seeds; slowest run {slowest:.0f} s).")
            else:
                verdicts.append(f"{LOG_NAMES[data]}: bar not judged, {runs} seed(s) logged of the {BAR_SEEDS} it "
                                f"takes ({checks}).")
    lines += ["", "Test split, mean ± std over seeds. Bar of the trainer issue:", ""]
    lines += [f"- {v}" for v in verdicts]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = quality_arguments(__doc__)
    parser.add_argument("--models", default="default,sasrec", help="comma-separated subset of: default,sasrec")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, force=True)
    run_log = RunLog(RUN_LOG_PATH)
    for data in args.data or DATASETS:
        run_dataset(run_log, data, list(range(args.seeds)), args.models.split(","), args.overrides)
    results, seeds = report(run_log, args.overrides)
    table = markdown(results, seeds)
    path = write_result("quality", results, with_machine=False)
    write_result("quality_meta", {"seeds": seeds, "overrides": args.overrides})
    (RESULTS_DIR / "quality.md").write_text(table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
