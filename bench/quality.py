"""Quality on the embedded logs: the default model and the SASRec-style baseline, 3 seeds
each, and the simple baselines (most popular, recency-frequency and, where actors and
targets are one ID space, two-way recency-frequency), under ../shared/BENCHMARK.md's
protocol.

    .venv/bin/python bench/quality.py                       # both logs, 3 seeds
    .venv/bin/python bench/quality.py --data collegemsg --seeds 1
    .venv/bin/python bench/quality.py --baselines-only      # trains nothing (seconds)

Writes bench/results/quality.json as exactly {dataset: {model: {name: {"mean", "std"}}}}:
the metrics, plus `evaluated_actors`, `candidates` and `run_seconds` (which also has
"max": the issue's budget is per run), and bench/results/quality.md, the table the
README shows. bench/results/quality_meta.json has the seeds behind each figure, the
CPUs their runs ran on (`cpus`, per log and model: a figure's seeds may come from several
machines, so the file names no one machine), and each recency-frequency rule's half-life with the validation NDCG@10 of every
half-life tried (`baseline_half_lives`: trainer.results.BaselineResults.half_lives).
Each finished run is kept in bench/results/runs.jsonl (shared with bench/ablation.py):
a rerun skips the runs already there (bench.runs.RunLog says what
identifies a run). A figure is over every seed the run log holds for it, so a subset run
(`--data collegemsg --seeds 1`) trains only what it asks for and never turns a 3-seed
figure into a 1-seed one; a log not asked for is reported from the run log, never trained.
The bar is judged only on 3 or more seeds.

The baselines are deterministic and cheap (seconds): they are computed afresh from each
log on every call, under the default model's config (its data, eval and baselines
sections, with the overrides), never taken from a training run, the half-lives chosen on
validation. `--baselines-only` trains nothing: the models' figures are the run log's, and
it refuses to write when the run log no longer holds a model quality.json shows (a config
or CODE_VERSION changed since), rather than drop that model's row.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, write_result  # noqa: E402
from bench.runs import (  # noqa: E402
    BASELINES, DATASETS, RUN_LOG_PATH, RunLog, format_mean_std, mean_std, quality_arguments, record_cpu,
)
from configs.loading import load_config  # noqa: E402
from data.prepare import prepare  # noqa: E402
from trainer.evaluation import METRIC_NAMES  # noqa: E402
from trainer.main import CONFIG_DIR  # noqa: E402
from trainer.results import baseline_results, half_life_label  # noqa: E402

MODELS = {"default": "{data}.yaml", "sasrec": "{data}-sasrec.yaml"}
LABELS = {
    "default": "default (HSTU + contact re-scoring)",
    "sasrec": "SASRec-style (causal transformer, same loss)",
    "two_way_recency_frequency": "two-way recency-frequency",
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


def baseline_figures(data: str, overrides: list[str]) -> tuple[dict, dict]:
    """({model: {name: {"mean", "std"}}}, {model: half-life entry}) of the baselines on one
    log: the test split, each recency-frequency rule at the half-life validation chose.
    One deterministic figure each (std 0)."""
    config = load_config(CONFIG_DIR / MODELS["default"].format(data=data), overrides)
    prepared = prepare(config.data)
    summary = prepared.summary()
    # The run's own count when eval.max_queries samples the actors (trainer.main does the same).
    evaluated = len(prepared.split.queries(prepared.seqs, "test", config.eval.max_queries))
    counts = {"evaluated_actors": mean_std([evaluated]), "candidates": mean_std([summary["candidates"]])}
    results = baseline_results(prepared, config.baselines, config.eval, splits=("test",))
    figures = {
        model: {**{metric: mean_std([metrics[metric]]) for metric in METRIC_NAMES}, **counts}
        for model, metrics in results.metrics["test"].items()
    }
    return figures, results.half_lives


def aggregate(records: dict[str, list[dict]], baselines: dict) -> dict:
    """{model: {name: {"mean", "std"}}} over the records of each trained model, then the
    baselines' figures (`baseline_figures`)."""
    out: dict = {}
    for model, runs in records.items():
        first = runs[0]
        out[model] = {metric: mean_std([r["test"][metric] for r in runs]) for metric in METRIC_NAMES}
        out[model]["evaluated_actors"] = mean_std([first["evaluated_actors"]])
        out[model]["candidates"] = mean_std([first["candidates"]])
        seconds = [r["seconds"] for r in runs]
        out[model]["run_seconds"] = {**mean_std(seconds), "max": max(seconds)}
    return {**out, **baselines}


def report(run_log: RunLog, overrides: list[str], datasets: list[str]) -> tuple[dict, dict, dict, dict]:
    """(quality.json's results, {dataset: {model: seeds}}, {dataset: {model: half-life
    entry}}, {dataset: {model: CPUs of its runs}}) from what the run log holds, for
    `datasets` and every log it holds runs of; the baselines computed afresh."""
    results, seeds, half_lives, cpus = {}, {}, {}, {}
    for data in DATASETS:
        records = {
            model: run_log.logged_seeds(data, model, CONFIG_DIR / config.format(data=data), overrides)
            for model, config in MODELS.items()
        }
        records = {model: runs for model, runs in records.items() if runs}
        if records or data in datasets:
            baselines, half_lives[data] = baseline_figures(data, overrides)
            results[data] = aggregate(records, baselines)
            seeds[data] = {model: [r["seed"] for r in runs] for model, runs in records.items()}
            cpus[data] = {
                model: sorted({record_cpu(r) or "unrecorded" for r in runs}) for model, runs in records.items()
            }
    return results, seeds, half_lives, cpus


def lost_models(results: dict, path: Path) -> list[str]:
    """'log/model' of every trained model that quality.json at `path` shows and `results`
    lacks: a --baselines-only report would drop its row."""
    if not path.exists():
        return []
    written = json.loads(path.read_text())
    return [
        f"{data}/{model}"
        for data, models in written.items()
        for model in models
        if model in MODELS and model not in results.get(data, {})
    ]


def markdown(results: dict, seeds: dict, half_lives: dict | None = None) -> str:
    """One table, both logs (the README's), then the bar where it can be judged. A
    recency-frequency row names its half-life (`half_lives`: {log: {model: entry}})."""
    half_lives = half_lives or {}
    metric_names = {"mean_rank": "mean rank"}
    lines = [
        "| log | model | seeds | " + " | ".join(metric_names.get(m, m.upper()) for m in METRIC_NAMES)
        + " | slowest run s |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in METRIC_NAMES) + " | ---: |",
    ]
    verdicts = []
    for data, models in results.items():
        for model in LABELS:
            if model not in models:
                continue
            stats, trained = models[model], model in MODELS
            runs = len(seeds[data][model]) if trained else 1  # a baseline: one deterministic figure
            cells = [format_mean_std(stats[m], runs, 1 if m == "mean_rank" else 4) for m in METRIC_NAMES]
            if model == "default":
                cells[METRIC_NAMES.index("ndcg@10")] = f"**{cells[METRIC_NAMES.index('ndcg@10')]}**"
            cells.append(f"{stats['run_seconds']['max']:.0f}" if trained else "-")
            seed_count = str(runs) if trained else "-"
            label = LABELS[model]
            if model in half_lives.get(data, {}):
                label += f" (h = {half_life_label(half_lives[data][model]['half_life_events'])})"
            lines.append(f"| {LOG_NAMES[data]} | {label} | {seed_count} | " + " | ".join(cells) + " |")
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
    lines += [
        "",
        "Test split, mean ± std over seeds. Baselines: one deterministic figure each; h, the "
        "recency-frequency half-life in events, chosen among 1, 5, 20 and inf by validation NDCG@10. "
        "Bar of the trainer issue:",
        "",
    ]
    lines += [f"- {v}" for v in verdicts]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = quality_arguments(__doc__)
    parser.add_argument("--models", default="default,sasrec", help="comma-separated subset of: default,sasrec")
    parser.add_argument(
        "--baselines-only", action="store_true",
        help="train nothing: recompute the baselines, report the models from the run log",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, force=True)
    run_log = RunLog(RUN_LOG_PATH)
    datasets = args.data or list(DATASETS)
    if not args.baselines_only:
        for data in datasets:
            run_dataset(run_log, data, list(range(args.seeds)), args.models.split(","), args.overrides)
    results, seeds, half_lives, cpus = report(run_log, args.overrides, datasets)
    lost = lost_models(results, RESULTS_DIR / "quality.json") if args.baselines_only else []
    if lost:
        raise SystemExit(
            f"--baselines-only: the run log holds no runs at the current config and code for {', '.join(lost)}, "
            "which quality.json shows; nothing written (train them, or rerun without --baselines-only)"
        )
    table = markdown(results, seeds, half_lives)
    path = write_result("quality", results, with_machine=False)
    write_result(
        "quality_meta",
        {"seeds": seeds, "cpus": cpus, "overrides": args.overrides, "baseline_half_lives": half_lives},
        with_machine=False,
    )
    (RESULTS_DIR / "quality.md").write_text(table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
