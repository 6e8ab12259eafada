"""Quality on the embedded logs: the default model, the SASRec-style baseline and the two
simple baselines, 3 seeds each, under ../shared/BENCHMARK.md's protocol.

    .venv/bin/python bench/quality.py                       # both logs, 3 seeds
    .venv/bin/python bench/quality.py --data collegemsg --seeds 1

Writes bench/results/quality.json as {dataset: {model: {metric: {"mean", "std"}}}} (plus
evaluated actors, candidates and training time) and bench/results/quality.md.
"""

from __future__ import annotations

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


def run_dataset(data: str, seeds: list[int], models: list[str], overrides: list[str]) -> dict:
    per_model: dict[str, list[dict]] = {m: [] for m in [*models, *BASELINES]}
    seconds: dict[str, list[float]] = {m: [] for m in models}
    summary = {}
    for model in models:
        for seed in seeds:
            results, run_seconds = train_and_test(CONFIG_DIR / MODELS[model].format(data=data), overrides, seed)
            seconds[model].append(run_seconds)
            per_model[model].append(results["metrics"]["test"]["model"])
            if model == models[0]:
                for baseline in BASELINES:
                    per_model[baseline].append(results["metrics"]["test"][baseline])
            summary = results["data"]
    out = {}
    for model, runs in per_model.items():
        if not runs:
            continue
        out[model] = {metric: mean_std([r[metric] for r in runs]) for metric in METRIC_NAMES}
        out[model]["runs"] = len(runs)
        if model in seconds:
            out[model]["train_seconds"] = mean_std(seconds[model])
    out["evaluated_actors"] = summary.get("evaluated_actors")
    out["candidates"] = summary.get("candidates")
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
    results = {
        data: run_dataset(data, list(range(args.seeds)), args.models.split(","), args.overrides)
        for data in (args.data or DATASETS)
    }
    table = markdown(results)
    path = write_result("quality", results)
    (RESULTS_DIR / "quality.md").write_text(table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
