"""Where the two-way recency-frequency rule wins and the model loses: the test queries of a
shared-ID-space log split by where the true target sits among the actor's contacts before
the query, with the model's and the rule's ranks in each group.

    .venv/bin/python bench/contact_split.py                      # CollegeMsg, seed 0 (~3 min)
    .venv/bin/python bench/contact_split.py --seed 1 -- loss.temperature=0.05
    .venv/bin/python bench/contact_split.py --tag late -- data.path=runs/derived/collegemsg-late.txt

Groups (every test query is in exactly one):
- `own`: the target is one the actor wrote to before (its own history);
- `incoming_only`: never written to by the actor, but it wrote to the actor before the
  query's time (the released events the two-way rule reads);
- `neither`: a new contact for the actor.
`own` is further split by whether the target is the most recent contact of the merged
stream (`own_latest`: the rule's half-life-1 top choice among contacts) or an older one.

Per group: queries and their share, NDCG@10 / HR@1 / HR@10 of the model (trained here,
its best model, as trainer.main tests it) and of the rule (half-life chosen on
validation), and how often the model ranks the target strictly better / worse than the
rule. Writes bench/results/contact_split_<data>.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_result  # noqa: E402
from configs.loading import load_config  # noqa: E402
from data.prepare import prepare  # noqa: E402
from data.sequences import Queries  # noqa: E402
from models.baselines import IncomingEvents  # noqa: E402
from trainer.evaluation import metrics_from_ranks  # noqa: E402
from trainer.loop import Trainer  # noqa: E402
from trainer.main import CONFIG_DIR  # noqa: E402
from trainer.metrics import MetricsLogger  # noqa: E402
from trainer.results import (  # noqa: E402
    baseline_ranks, baseline_results, rank_queries, recency_scorers, released_incoming,
)

RULE = "two_way_recency_frequency"


def contact_groups(
    targets: np.ndarray, actors: np.ndarray, times: np.ndarray, queries: Queries, incoming: IncomingEvents
) -> dict[str, np.ndarray]:
    """{group: [Q] bool} for the queries (see the module docstring). `targets`, `times`:
    the flat event arrays; `actors`: each query's actor (one ID space with targets)."""
    num = len(queries.position)
    true = targets[queries.position]
    query_time = times[queries.position]
    own = np.zeros(num, dtype=bool)
    latest = np.zeros(num, dtype=bool)
    reached = np.zeros(num, dtype=bool)
    order = np.argsort(incoming.receivers, kind="stable")
    receivers = incoming.receivers[order]
    bounds = np.searchsorted(receivers, actors[:, None] + np.array([0, 1]))
    for q in range(num):
        history = slice(queries.history_start[q], queries.position[q])
        own_targets, own_times = targets[history], times[history]
        own[q] = bool((own_targets == true[q]).any())
        into = order[bounds[q, 0] : bounds[q, 1]]
        into = into[(incoming.timestamps[into] < query_time[q]) & (incoming.senders[into] != actors[q])]
        reached[q] = bool((incoming.senders[into] == true[q]).any())
        # The merged stream's newest contact: within a source the last of its newest second;
        # a tie across the sources is counted as no one's (the rule breaks it by file row).
        last_own = own_times.max(initial=-1)
        last_in = incoming.timestamps[into].max(initial=-1)
        if last_own >= 0 or last_in >= 0:
            if last_own > last_in:
                newest = own_targets[own_times == last_own][-1]
            elif last_in > last_own:
                newest = incoming.senders[into][incoming.timestamps[into] == last_in][-1]
            else:
                newest = -1  # a tie across the sources: not counted as latest
            latest[q] = newest == true[q]
    return {
        "own_latest": own & latest,
        "own_older": own & ~latest,
        "incoming_only": reached & ~own,
        "neither": ~own & ~reached,
    }


def group_table(groups: dict[str, np.ndarray], model_ranks: np.ndarray, rule_ranks: np.ndarray) -> dict:
    total = len(model_ranks)
    table = {}
    for name, mask in {"all": np.ones(total, dtype=bool), **groups}.items():
        model, rule = metrics_from_ranks(model_ranks[mask]), metrics_from_ranks(rule_ranks[mask])
        table[name] = {
            "queries": int(mask.sum()),
            "share": float(mask.mean()) if total else float("nan"),
            "model": {k: model[k] for k in ("ndcg@10", "hr@1", "hr@10")},
            "rule": {k: rule[k] for k in ("ndcg@10", "hr@1", "hr@10")},
            "model_better": int((model_ranks[mask] < rule_ranks[mask]).sum()),
            "model_worse": int((model_ranks[mask] > rule_ranks[mask]).sum()),
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="collegemsg")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="results file contact_split_<data>_<tag>.json (for overrides)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (after --)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(CONFIG_DIR / f"{args.data}.yaml", [f"seed={args.seed}", f"output_dir={tmp}", *args.overrides])
        prepared = prepare(config.data, Path(tmp) / "prepared")
        if not prepared.log.shared_id_space:
            raise SystemExit(f"{args.data}: actors and targets are not one ID space; there is no two-way rule")
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        trainer = Trainer(config, prepared, MetricsLogger(None, enabled=False), run_dir=run_dir)
        summary = trainer.train()
        trainer.prepare_test_model()
        model_ranks = trainer.query_ranks("test")
    half_life = baseline_results(prepared, config.baselines, config.eval, splits=("valid",)).half_lives[RULE]
    queries = rank_queries(prepared, "test", config.eval)
    rule = recency_scorers(prepared, "test", queries)[RULE](float(half_life["half_life_events"]))
    rule_ranks = baseline_ranks(prepared, queries, rule, config.eval)
    seqs = prepared.seqs
    groups = contact_groups(
        seqs.targets, seqs.actor[queries.sequence], seqs.timestamps, queries, released_incoming(prepared, "test")
    )
    table = group_table(groups, model_ranks, rule_ranks)
    result = {
        "data": args.data, "seed": args.seed, "overrides": args.overrides, "best_step": summary.best_step,
        "rule_half_life_events": half_life["half_life_events"], "groups": table,
    }
    path = write_result(f"contact_split_{args.data}" + (f"_{args.tag}" if args.tag else ""), result)
    print(f"{'group':<14} {'queries':>8} {'share':>6}  {'model NDCG@10':>13} {'rule':>6}  {'model HR@1':>10} {'rule':>6}"
          f"  {'better':>6} {'worse':>6}")
    for name, row in table.items():
        print(f"{name:<14} {row['queries']:>8} {row['share']:>6.1%}  {row['model']['ndcg@10']:>13.4f} "
              f"{row['rule']['ndcg@10']:>6.4f}  {row['model']['hr@1']:>10.4f} {row['rule']['hr@1']:>6.4f}  "
              f"{row['model_better']:>6} {row['model_worse']:>6}")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
