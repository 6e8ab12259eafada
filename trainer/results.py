"""Results of a run: the baselines, the metrics table and the files a run leaves behind."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import polars as pl
import torch

from configs.schema import BaselineConfig, EvalConfig
from data.dataset import SPLIT_LABELS, target_rows_of_rank
from data.prepare import PreparedData
from data.sequences import Queries
from models.baselines import (
    HALF_LIVES, IncomingEvents, MostPopularScorer, RecencyFrequencyScorer, SeenScores, TwoWayRecencyFrequencyScorer,
)
from trainer.distributed import Distributed, QueryGather
from trainer.evaluation import METRIC_NAMES, SeenTargets, full_ranking_ranks, metrics_from_ranks

if TYPE_CHECKING:
    from trainer.loop import TrainSummary

log = logging.getLogger(__name__)


def evaluation_queries(prepared: PreparedData, split: Literal["valid", "test"], eval_config: EvalConfig) -> Queries:
    """The split's queries, every evaluated actor or the configured sample of them."""
    return prepared.split.queries(prepared.seqs, split, eval_config.max_queries)


def rank_queries(
    prepared: PreparedData, split: Literal["valid", "test"], eval_config: EvalConfig, dist: Distributed = Distributed()
) -> Queries:
    """The split's queries about this rank's actors (every query on one process); with
    `eval.max_queries`, of the same sample of actors one process draws from all of them."""
    max_queries = eval_config.max_queries
    if prepared.share[1] == 1 or not max_queries:
        queries = evaluation_queries(prepared, split, eval_config)
        return queries.subset(prepared.sequences_of_rank(dist.rank, dist.world_size)[queries.sequence])
    # A share knows only its own evaluated actors: the sample is drawn over everyone's.
    queries = prepared.split.queries(prepared.seqs, split)
    actors = prepared.seqs.actor[queries.sequence]
    everyone = np.sort(dist.gather_varying(torch.from_numpy(actors)).numpy())
    if max_queries < len(everyone):
        chosen = np.random.default_rng(0).choice(len(everyone), size=max_queries, replace=False)
        everyone = everyone[np.sort(chosen)]
    return queries.subset(np.isin(actors, everyone))


def seen_targets(prepared: PreparedData, queries: Queries) -> SeenTargets:
    """Each queried actor's past targets before the query (exclude-seen mode)."""
    lengths = queries.position - queries.history_start
    offsets = np.r_[0, np.cumsum(lengths)]
    flat = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths) + np.repeat(queries.history_start, lengths)
    return SeenTargets(offsets=offsets, targets=prepared.seqs.targets[flat])


@dataclass(frozen=True)
class BaselineResults:
    """Every baseline's metrics on both splits, and the half-life each recency-frequency
    rule ran with (one deterministic figure each: no seeds)."""

    metrics: dict[str, dict[str, dict[str, float]]]
    """{split: {model: {metric: value}}}; models `most_popular`, `recency_frequency` and,
    where actors and targets are one ID space, `two_way_recency_frequency`."""
    half_lives: dict[str, dict]
    """{model: {"half_life_events": h, "chosen_by": "valid ndcg@10" | "config",
    "valid_ndcg@10": {label: value}}} for each recency-frequency rule: h a number, or
    "inf" (JSON has no infinity); the labels are `half_life_label`s of each half-life
    ranked on validation (none for a fixed half-life when only test was asked for)."""

    def note(self) -> str:
        """One line naming each rule's half-life (and the validation NDCG@10 behind the
        choice), for the results table."""
        parts = []
        for model, entry in self.half_lives.items():
            tried = ", ".join(f"{h}: {v:.4f}" for h, v in entry["valid_ndcg@10"].items())
            how = "chosen on validation NDCG@10" if entry["chosen_by"] != "config" else "set in the config"
            how += f"; valid NDCG@10 {tried}" if tried else ""
            parts.append(f"{model} {half_life_label(entry['half_life_events'])} ({how})")
        return "Recency-frequency half-lives (events): " + "; ".join(parts) + "."


def half_life_label(half_life: float | str) -> str:
    """'1', '5', '20', 'inf', '2.5': a half-life as tables and JSON keys name it."""
    value = float(half_life)
    return "inf" if math.isinf(value) else f"{value:g}"


def _ranking_metrics(
    prepared: PreparedData, queries: Queries, scorer: object, eval_config: EvalConfig, dist: Distributed
) -> dict[str, float]:
    """Metrics of a baseline over every rank's queries."""
    return metrics_from_ranks(baseline_ranks(prepared, queries, scorer, eval_config, dist))


def baseline_ranks(
    prepared: PreparedData, queries: Queries, scorer: object, eval_config: EvalConfig, dist: Distributed = Distributed()
) -> np.ndarray:
    """[Q] rank of each query's true target under a baseline, over every rank's queries in
    actor order. On several ranks they are ranked as the model is: each rank computes its
    own queries' states (they need only the actor's own data), the states are gathered,
    and each rank scores every query against the candidates among its targets
    (`target_rows_of_rank`, whose counts `baseline_counts` gave the scorer), the counts
    summed over ranks. No rank holds a per-target array of every target."""
    seen = seen_targets(prepared, queries) if eval_config.exclude_seen else None
    true_targets = prepared.seqs.targets[queries.position]
    options = dict(query_chunk_size=eval_config.query_chunk_size, candidate_chunk_size=eval_config.candidate_chunk_size)
    if dist.world_size == 1:
        return full_ranking_ranks(scorer, true_targets, prepared.stats.candidates, seen=seen, **options)
    gather = QueryGather.of(prepared.seqs.actor[queries.sequence], dist)
    if seen is not None:
        seen = SeenTargets(*gather.jagged(np.diff(seen.offsets), seen.targets))
    start, stop = baseline_target_rows(prepared, dist)
    owned = prepared.stats.candidates_in(start, stop)
    return full_ranking_ranks(
        _GatheredQueries(scorer, gather, len(queries)), gather.values(true_targets), owned, seen=seen,
        count_sum=dist.sum, score_max=dist.max, **options,
    )


def baseline_counts(prepared: PreparedData, split: Literal["valid", "test"], dist: Distributed) -> dict:
    """The popularity arguments of a baseline scorer: the split's known counts (of this
    rank's targets, `target_rows_of_rank`, on several ranks, with the ranks to agree
    the popularity ranks over)."""
    counts = prepared.known_counts(split)
    if dist.world_size == 1:
        return {"counts": counts}
    start, stop = baseline_target_rows(prepared, dist)
    if prepared.target_rows is None:  # every target's counts (the whole log, in memory)
        counts = counts[start:stop]
    return {"counts": counts, "first_target": start, "ranks": dist}


def baseline_target_rows(prepared: PreparedData, dist: Distributed) -> tuple[int, int]:
    """The targets this rank ranks the baselines over: those whose counts a share holds,
    else its even share of them all."""
    if prepared.target_rows is not None:
        return prepared.target_rows
    return target_rows_of_rank(prepared.seqs.num_targets, dist.rank, dist.world_size)


class _GatheredQueries:
    """A baseline scorer of this rank's queries as a scorer of every rank's, in actor
    order. For each chunk of those, each rank computes the states (`SeenScores`) of its
    own queries in it and the chunk's are gathered: no rank holds more than a chunk's
    (collective: every rank asks for the same chunks, in the same order). Targets the
    scorer's counts leave out score -inf, so a true target's score (`score_pairs`) is the
    maximum over ranks."""

    def __init__(self, scorer, gather: QueryGather, num_local: int) -> None:
        self.scorer, self.dist = scorer, gather.dist
        # Where each of this rank's queries goes among all: ascending, as a rank's queries
        # come in actor order, so a chunk's are a run of them.
        self.rows_of_local = gather.position[gather.offset : gather.offset + num_local]
        if np.any(np.diff(self.rows_of_local) <= 0):
            raise ValueError("baselines: a rank's queries must come in actor order")

    def query_state(self, rows: slice):
        lo, hi = (int(i) for i in np.searchsorted(self.rows_of_local, [rows.start, rows.stop]))
        local = self.scorer.query_state(slice(lo, hi))
        if not isinstance(local, SeenScores):  # the chunk's number of queries (most popular)
            return rows.stop - rows.start
        chunk_rows = torch.from_numpy(self.rows_of_local[lo:hi] - rows.start)[local.rows]
        chunk_rows = self.dist.gather_varying(chunk_rows)
        targets, primary = self.dist.gather_varying(local.targets), self.dist.gather_varying(local.primary)
        order = torch.argsort(chunk_rows, stable=True)
        return SeenScores(rows.stop - rows.start, chunk_rows[order], targets[order], primary[order])

    def score(self, state, candidate_ids: torch.Tensor) -> torch.Tensor:
        return self.scorer.score(state, candidate_ids)

    def score_pairs(self, state, target_ids: torch.Tensor) -> torch.Tensor:
        return self.dist.max(self.scorer.score_pairs(state, target_ids))


def released_incoming(prepared: PreparedData, split: Literal["valid", "test"]) -> IncomingEvents:
    """The events a split's queries may read as having reached their actors: training
    events for validation, every non-test event for test (the events
    `PreparedData.incoming_events(split)` holds), with their rows in the file.
    NOTE: from `incoming_log` when it carries the rows; otherwise from the share's own
    events, which hold every event that reached anyone only when the share is the whole
    log (a share of it is refused: the two-way rule would miss the other shares' senders)."""
    incoming_log = prepared.incoming_log
    if incoming_log is not None and "row" in incoming_log.columns:
        known = incoming_log.filter(pl.col("split") <= SPLIT_LABELS["train" if split == "valid" else "valid"])
        return IncomingEvents(*(known[c].to_numpy() for c in ("target", "actor", "timestamp", "row")))
    whole = (prepared.totals or {}).get("events", prepared.log.num_events)
    if prepared.log.num_events != whole:
        raise ValueError(
            f"two-way recency-frequency: this share holds {prepared.log.num_events:,} of the log's {whole:,} events "
            "and its incoming events carry no file rows; evaluate the baselines on the whole log"
        )
    seqs = prepared.seqs
    known = prepared.split.known_mask(seqs, split)
    # Sequences' flat order is the event table's (actor, timestamp, row) order.
    rows = prepared.log.events["row"].to_numpy()
    senders = np.repeat(seqs.actor, seqs.lengths)
    return IncomingEvents(receivers=seqs.targets[known], senders=senders[known],
                          timestamps=seqs.timestamps[known], rows=rows[known])


def recency_scorers(
    prepared: PreparedData, split: Literal["valid", "test"], queries: Queries, dist: Distributed = Distributed()
) -> dict[str, Callable]:
    """{model: half-life -> scorer} of the recency-frequency rules that apply to the log.
    Both read only what the split has released: the actor's own history before the query
    and, two-way, `released_incoming`."""
    seqs = prepared.seqs
    popularity = baseline_counts(prepared, split, dist)
    rules: dict[str, Callable] = {
        "recency_frequency": lambda h: RecencyFrequencyScorer(
            history_targets=seqs.targets, history_start=queries.history_start, position=queries.position,
            half_life_events=h, **popularity,
        )
    }
    if prepared.log.shared_id_space:
        actor = np.repeat(seqs.actor, seqs.lengths)
        rows = prepared.log.events["row"].to_numpy().astype(np.int64)
        incoming = released_incoming(prepared, split)
        rules["two_way_recency_frequency"] = lambda h: TwoWayRecencyFrequencyScorer(
            event_actor=actor, event_targets=seqs.targets, event_timestamps=seqs.timestamps, event_rows=rows,
            incoming=incoming, history_start=queries.history_start, position=queries.position, half_life_events=h,
            **popularity,
        )
    return rules


def baseline_results(
    prepared: PreparedData,
    baselines: BaselineConfig,
    eval_config: EvalConfig,
    splits: tuple[Literal["valid", "test"], ...] = ("valid", "test"),
    dist: Distributed = Distributed(),
) -> BaselineResults:
    """Most-popular and the recency-frequency rules on the splits asked for. With
    `baselines.recency_half_life_events: auto` each rule's half-life is the one of
    HALF_LIVES with the best validation NDCG@10 (the first, i.e. shortest, of equals), as
    ../shared/BENCHMARK.md says; the validation passes are computed once and give the
    validation figures too. The choice is logged. On several ranks every rank calls it
    (collective: `baseline_ranks`)."""
    queries = {split: rank_queries(prepared, split, eval_config, dist) for split in ("valid", "test")}
    fixed = baselines.recency_half_life_events
    half_lives = HALF_LIVES if fixed == "auto" else (float(fixed),)
    metrics: dict[str, dict[str, dict[str, float]]] = {split: {} for split in splits}
    # One split's per-target arrays (known counts, popularity) at a time.
    for split in splits:
        metrics[split]["most_popular"] = _ranking_metrics(
            prepared, queries[split], MostPopularScorer(**baseline_counts(prepared, split, dist)), eval_config, dist
        )
    chosen: dict[str, dict] = {}
    best_half_life: dict[str, float] = {}
    valid_rules = recency_scorers(prepared, "valid", queries["valid"], dist)
    for model, scorer_at in valid_rules.items():
        # A fixed half-life needs no validation pass unless validation figures are asked for
        # (one ranking of every candidate fewer where each costs minutes).
        ranked = half_lives if fixed == "auto" or "valid" in splits else ()
        tried = {h: _ranking_metrics(prepared, queries["valid"], scorer_at(h), eval_config, dist) for h in ranked}
        best = half_lives[0]
        if tried:
            # NaN (no query) never wins; the first (shortest) of equals does.
            best = max(tried, key=lambda h: -math.inf if math.isnan(tried[h]["ndcg@10"]) else tried[h]["ndcg@10"])
        best_half_life[model] = best
        chosen[model] = {
            "half_life_events": "inf" if math.isinf(best) else best,
            "chosen_by": "config" if fixed != "auto" else "valid ndcg@10",
            "valid_ndcg@10": {half_life_label(h): tried[h]["ndcg@10"] for h in ranked},
        }
        if "valid" in splits:
            metrics["valid"][model] = tried[best]
    del valid_rules, scorer_at  # their validation arrays, before the test's are made
    if "test" in splits:
        for model, scorer_at in recency_scorers(prepared, "test", queries["test"], dist).items():
            metrics["test"][model] = _ranking_metrics(
                prepared, queries["test"], scorer_at(best_half_life[model]), eval_config, dist
            )
    results = BaselineResults(metrics=metrics, half_lives=chosen)
    log.info("baselines: %s", results.note())
    return results


def evaluate_baselines(
    prepared: PreparedData, split: Literal["valid", "test"], baselines: BaselineConfig, eval_config: EvalConfig
) -> dict[str, dict[str, float]]:
    """{model: metrics} of every baseline on the split's queries (`baseline_results` for
    one split: the half-lives are still chosen on validation). For both splits, call
    `baseline_results` once: it passes over validation once for both."""
    return baseline_results(prepared, baselines, eval_config, splits=(split,)).metrics[split]


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


def run_results(
    name: str, data: dict, training: TrainSummary, test: dict[str, float], baseline: BaselineResults, resources: dict
) -> tuple[dict, str]:
    """What a run reports: results.json's contents and the markdown table printed (the
    model's and the baselines' test metrics, titled with what was ranked)."""
    baselines = baseline.metrics
    rows = {"model": test, **baselines["test"]}
    title = (
        f"{name}: test split, {data['evaluated_actors']:,} evaluated actors"
        + (f" (a sample of {data['evaluable_actors']:,})" if "evaluable_actors" in data else "") + ", "
        f"{data['candidates']:,} candidates; model from step {training.best_step} of {training.steps}"
    )
    table = markdown_table(rows, title) + "\n\n" + baseline.note()
    results = {
        "name": name,
        "data": data,
        "training": {
            "steps": training.steps,
            "best_step": training.best_step,
            "stopped_early": training.stopped_early,
            "train_seconds": training.train_seconds,
            "examples_per_s": training.examples_per_s,
        },
        "resources": resources,
        "metrics": {
            "test": rows,
            "valid": {"model": training.best_valid, **baselines["valid"]},
        },
        "baselines": baseline.half_lives,
    }
    return results, table


def write_results(run_dir: Path, results: dict, table: str) -> None:
    """results.json (strict JSON: NaN as null) and results.md in the run directory, each
    written atomically."""
    text = json.dumps(json_safe(results), indent=2, allow_nan=False)
    for name, text in (("results.json", text), ("results.md", table + "\n")):
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(run_dir / name)
