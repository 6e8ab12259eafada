"""Quality on the embedded logs: the default model, the SASRec-style baseline and the two
simple baselines, 3 seeds each, under ../shared/BENCHMARK.md's protocol.

    .venv/bin/python bench/quality.py                       # both logs, 3 seeds
    .venv/bin/python bench/quality.py --data collegemsg --seeds 1

Writes bench/results/quality.json as {dataset: {model: {metric: {"mean", "std"}}}} (plus
evaluated actors, candidates and training time) and bench/results/quality.md. Each
finished run is kept in bench/results/runs.jsonl (shared with bench/ablation.py): a rerun
skips the runs already there (see bench.runs.RunLog for what identifies a run), and the
data sets not asked for this time keep their earlier figures in quality.json.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, write_result  # noqa: E402
from bench.runs import BASELINES, DATASETS, RUN_LOG_PATH, RunLog, mean_std, quality_arguments  # noqa: E402
from trainer.evaluation import METRIC_NAMES  # noqa: E402
from trainer.main import CONFIG_DIR  # noqa: E402

MODELS = {"default": "{data}.yaml", "sasrec": "{data}-sasrec.yaml"}
# The bar of the trainer issue: mean of 3 seeds, default config, test split.
BAR = {"collegemsg": {"ndcg@10": 0.476, "hr@10": 0.578}, "ml-100k": {"ndcg@10": 0.058, "hr@10": 0.125}}


RUN_LOG = RunLog(RUN_LOG_PATH)


def run_dataset(data: str, seeds: list[int], models: list[str], overrides: list[str]) -> dict:
    """Train what the run log lacks, then aggregate over seeds."""
    records = {
        model: [RUN_LOG.run(data, model, seed, CONFIG_DIR / MODELS[model].format(data=data), overrides) for seed in seeds]
        for model in models
    }
    return aggregate(records)


def aggregate(records: dict[str, list[dict]]) -> dict:
    out: dict = {}
    for model, runs in records.items():
        out[model] = {metric: mean_std([r["test"][metric] for r in runs]) for metric in METRIC_NAMES}
        out[model]["runs"] = len(runs)
        out[model]["train_seconds"] = mean_std([r["seconds"] for r in runs])
    # The baselines are deterministic: the same in every run.
    first = next(iter(records.values()))[0]
    for baseline in BASELINES:
        out[baseline] = {metric: mean_std([first["baselines"][baseline][metric]]) for metric in METRIC_NAMES}
    out["evaluated_actors"], out["candidates"] = first["evaluated_actors"], first["candidates"]
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
    results = {data: new.get(data, previous.get(data)) for data in DATASETS if data in new or data in previous}
    table = markdown(results)
    path = write_result("quality", results)
    (RESULTS_DIR / "quality.md").write_text(table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
