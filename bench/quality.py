"""Quality on the embedded logs: the default model, the SASRec-style baseline and the two
simple baselines, 3 seeds each, under ../shared/BENCHMARK.md's protocol.

    .venv/bin/python bench/quality.py                       # both logs, 3 seeds
    .venv/bin/python bench/quality.py --data collegemsg --seeds 1

Writes bench/results/quality.json as {dataset: {model: {metric: {"mean", "std"}}}} (plus
evaluated actors, candidates and training time) and bench/results/quality.md. Each
finished run is kept in bench/results/quality_runs.jsonl: a rerun skips the runs already
there (delete the file to start afresh), and the data sets not asked for this time keep
their earlier figures in quality.json.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, write_result  # noqa: E402
from bench.runs import DATASETS, mean_std, quality_arguments, train_and_test  # noqa: E402
from trainer.evaluation import METRIC_NAMES  # noqa: E402
from trainer.main import CONFIG_DIR  # noqa: E402

MODELS = {"default": "{data}.yaml", "sasrec": "{data}-sasrec.yaml"}
BASELINES = ("most_popular", "recency_frequency")
# The bar of the trainer issue: mean of 3 seeds, default config, test split.
BAR = {"collegemsg": {"ndcg@10": 0.476, "hr@10": 0.578}, "ml-100k": {"ndcg@10": 0.058, "hr@10": 0.125}}


RUNS_FILE = RESULTS_DIR / "quality_runs.jsonl"


def _load_runs() -> list[dict]:
    if not RUNS_FILE.exists():
        return []
    return [json.loads(line) for line in RUNS_FILE.read_text().splitlines() if line.strip()]


def run_dataset(data: str, seeds: list[int], models: list[str], overrides: list[str]) -> dict:
    """Train what is missing, then aggregate. Every finished run is appended to
    RUNS_FILE at once, so an interrupted benchmark resumes where it stopped (a run is
    identified by data set, model, seed and overrides)."""
    done = {(r["data"], r["model"], r["seed"], tuple(r["overrides"])) for r in _load_runs()}
    for model in models:
        for seed in seeds:
            if (data, model, seed, tuple(overrides)) in done:
                continue
            results, run_seconds = train_and_test(CONFIG_DIR / MODELS[model].format(data=data), overrides, seed)
            test = results["metrics"]["test"]
            record = {
                "data": data, "model": model, "seed": seed, "overrides": overrides, "seconds": run_seconds,
                "test": test["model"], "baselines": {b: test[b] for b in BASELINES},
                "evaluated_actors": results["data"]["evaluated_actors"], "candidates": results["data"]["candidates"],
            }
            RUNS_FILE.parent.mkdir(parents=True, exist_ok=True)
            with RUNS_FILE.open("a") as f:
                f.write(json.dumps(record) + "\n")
    return aggregate(data, seeds, models, overrides)


def aggregate(data: str, seeds: list[int], models: list[str], overrides: list[str]) -> dict:
    runs = [r for r in _load_runs() if r["data"] == data and r["seed"] in seeds and r["overrides"] == overrides]
    out: dict = {}
    for model in models:
        mine = [r for r in runs if r["model"] == model]
        if not mine:
            continue
        out[model] = {metric: mean_std([r["test"][metric] for r in mine]) for metric in METRIC_NAMES}
        out[model]["runs"] = len(mine)
        out[model]["train_seconds"] = mean_std([r["seconds"] for r in mine])
    # The baselines are deterministic: the same in every run.
    first = [r for r in runs if r["model"] in models]
    for baseline in BASELINES:
        if first:
            out[baseline] = {metric: mean_std([r["baselines"][baseline][metric] for r in first]) for metric in METRIC_NAMES}
            out[baseline]["runs"] = len(first)
    if first:
        out["evaluated_actors"], out["candidates"] = first[0]["evaluated_actors"], first[0]["candidates"]
    return out


def markdown(results: dict) -> str:
    lines = []
    for data, models in results.items():
        lines += [
            f"**{data}** ({models['evaluated_actors']:,} evaluated actors, {models['candidates']:,} candidates; "
            "test split, mean ± std over seeds)",
            "",
            "| model | " + " | ".join(METRIC_NAMES) + " | run s |",
            "|---|" + "---:|" * (len(METRIC_NAMES) + 1),
        ]
        for model, metrics in models.items():
            if not isinstance(metrics, dict):
                continue
            cells = []
            for metric in METRIC_NAMES:
                m, s = metrics[metric]["mean"], metrics[metric]["std"]
                cells.append(f"{m:.1f} ± {s:.1f}" if metric == "mean_rank" else f"{m:.4f} ± {s:.4f}")
            t = metrics.get("train_seconds")
            cells.append(f"{t['mean']:.0f}" if t else "-")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        if "default" in models and data in BAR:
            checks = [
                f"{metric} {models['default'][metric]['mean']:.4f} "
                f"{'>=' if models['default'][metric]['mean'] >= bar else '<'} {bar}"
                for metric, bar in BAR[data].items()
            ]
            lines += ["", f"Bar (default model, mean over seeds): {'; '.join(checks)}."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = quality_arguments(__doc__)
    parser.add_argument("--models", default="default,sasrec", help="comma-separated subset of: default,sasrec")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, force=True)
    new = {
        data: run_dataset(data, list(range(args.seeds)), args.models.split(","), args.overrides)
        for data in (args.data or DATASETS)
    }
    previous_file = RESULTS_DIR / "quality.json"
    previous = json.loads(previous_file.read_text()) if previous_file.exists() else {}
    results = {data: previous[data] for data in DATASETS if data in previous and data not in new} | new
    results = {data: results[data] for data in DATASETS if data in results}
    table = markdown(results)
    path = write_result("quality", results)
    (RESULTS_DIR / "quality.md").write_text(table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
