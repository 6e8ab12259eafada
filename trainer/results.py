"""Results of a run: the baselines, the metrics table and the files a run leaves behind."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np

from configs.schema import BaselineConfig, EvalConfig
from data.prepare import PreparedData
from data.sequences import Queries
from models.baselines import MostPopularScorer, RecencyFrequencyScorer
from trainer.evaluation import METRIC_NAMES, SeenTargets, full_ranking_ranks, metrics_from_ranks


def evaluation_queries(prepared: PreparedData, split: Literal["valid", "test"], eval_config: EvalConfig) -> Queries:
    """The split's queries, every evaluated actor or the configured sample of them."""
    return prepared.split.queries(prepared.seqs, split, eval_config.max_queries)


def seen_targets(prepared: PreparedData, queries: Queries) -> SeenTargets:
    """Each queried actor's past targets before the query (exclude-seen mode)."""
    lengths = queries.position - queries.history_start
    offsets = np.r_[0, np.cumsum(lengths)]
    flat = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths) + np.repeat(queries.history_start, lengths)
    return SeenTargets(offsets=offsets, targets=prepared.seqs.targets[flat])


def evaluate_baselines(
    prepared: PreparedData, split: Literal["valid", "test"], baselines: BaselineConfig, eval_config: EvalConfig
) -> dict[str, dict[str, float]]:
    """Metrics of most-popular and recency-frequency on the split's queries."""
    seqs, queries = prepared.seqs, evaluation_queries(prepared, split, eval_config)
    counts = prepared.split.known_counts(seqs, split)
    true_targets = seqs.targets[queries.position]
    seen = seen_targets(prepared, queries) if eval_config.exclude_seen else None
    scorers = {
        "most_popular": MostPopularScorer(counts),
        "recency_frequency": RecencyFrequencyScorer(
            counts, seqs.targets, queries.history_start, queries.position, baselines.recency_half_life_events
        ),
    }
    return {
        name: metrics_from_ranks(
            full_ranking_ranks(
                scorer,
                true_targets,
                prepared.stats.candidates,
                query_chunk_size=eval_config.query_chunk_size,
                candidate_chunk_size=eval_config.candidate_chunk_size,
                seen=seen,
            )
        )
        for name, scorer in scorers.items()
    }


def _format(name: str, value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.1f}" if name == "mean_rank" else f"{value:.4f}"


def markdown_table(rows: dict[str, dict[str, float]], title: str = "") -> str:
    """One row per model, one column per metric (METRIC_NAMES order)."""
    header = "| model | " + " | ".join(m.upper() if m != "mean_rank" else "mean rank" for m in METRIC_NAMES) + " |"
    lines = [title, ""] if title else []
    lines += [header, "|---|" + "---:|" * len(METRIC_NAMES)]
    for model, metrics in rows.items():
        lines.append(f"| {model} | " + " | ".join(_format(m, metrics[m]) for m in METRIC_NAMES) + " |")
    return "\n".join(lines)


def json_safe(value: object) -> object:
    """`value` with every non-finite float as None: JSON has no NaN (json.dumps would
    write a bare `NaN` most readers reject), and a metric no query produced is absent."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_results(run_dir: Path, results: dict, table: str) -> None:
    """results.json (strict JSON: NaN as null) and results.md in the run directory, each
    written atomically."""
    text = json.dumps(json_safe(results), indent=2, allow_nan=False)
    for name, text in (("results.json", text), ("results.md", table + "\n")):
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(run_dir / name)
