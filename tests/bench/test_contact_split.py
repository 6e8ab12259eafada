"""bench/contact_split.py: every test query in one group, by where its target sat among the
actor's contacts before the query."""

import numpy as np

from bench.contact_split import contact_groups, group_table
from data.sequences import Queries
from models.baselines import IncomingEvents


def test_each_query_lands_in_the_group_its_target_belongs_to():
    # Actor 0 wrote to 1 at t=10 and 2 at t=30; 3, 4 and 5 wrote to it at t=20, 40, 60.
    # Five queries with that history, each its own sequence: (target, time).
    asked = [(2, 50), (4, 50), (5, 50), (2, 35), (1, 50)]
    targets = np.array([x for target, _ in asked for x in (1, 2, target)])
    times = np.array([x for _, time in asked for x in (10, 30, time)])
    queries = Queries(sequence=np.arange(5), position=np.arange(5) * 3 + 2, history_start=np.arange(5) * 3)
    incoming = IncomingEvents(
        receivers=np.array([0, 0, 0, 7]), senders=np.array([3, 4, 5, 2]), timestamps=np.array([20, 40, 60, 5]),
        rows=np.arange(4),
    )
    groups = contact_groups(targets, np.zeros(5, dtype=np.int64), times, queries, incoming)
    expected = {
        "own_latest": [3],  # at t=35 the newest of the merged stream is 2 (t=30)
        "own_older": [0, 4],  # at t=50 the newest is 4 (t=40), which wrote in
        "incoming_only": [1],
        "neither": [2],  # 5 writes at t=60, after the query
    }
    assert {name: np.flatnonzero(mask).tolist() for name, mask in groups.items()} == expected
    assert sum(mask.astype(int) for mask in groups.values()).tolist() == [1] * 5


def test_the_table_compares_the_ranks_query_by_query():
    groups = {"a": np.array([True, True, False]), "b": np.array([False, False, True])}
    table = group_table(groups, model_ranks=np.array([1, 5, 20]), rule_ranks=np.array([2, 3, 20]))
    assert table["all"]["queries"] == 3 and table["a"]["share"] == 2 / 3
    assert (table["a"]["model_better"], table["a"]["model_worse"]) == (1, 1)
    assert (table["b"]["model_better"], table["b"]["model_worse"]) == (0, 0)
    assert table["a"]["model"]["hr@1"] == 0.5 and table["a"]["rule"]["hr@1"] == 0.0
