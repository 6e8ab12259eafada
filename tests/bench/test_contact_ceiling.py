"""bench/contact_ceiling.py: its harness follows the benchmark protocol (the rule it computes
is trainer/results.py's, to the digit), its features are the ones it names, and its ranker
learns what its features say."""

import numpy as np
import pytest

from bench.contact_ceiling import (
    GROUP_WIDTHS, ContactQuery, EventIndex, build_queries, contact_query, fit_ranker, ndcg_at_10, rule_score,
    valid_score, _columns,
)
from configs.loading import load_config
from data.prepare import prepare
from trainer.main import CONFIG_DIR
from trainer.results import baseline_results


def _index(events: list[tuple[int, int, int]]) -> EventIndex:
    actor, target, time = (np.array(column) for column in zip(*events))
    return EventIndex(actor, target, time, np.arange(len(events)))


@pytest.mark.slow
def test_the_rule_computed_here_is_the_trainers_two_way_rule_on_collegemsg():
    config = load_config(CONFIG_DIR / "collegemsg.yaml", [])
    prepared = prepare(config.data)
    events = prepared.log.events
    index = EventIndex(*(events[c].to_numpy() for c in ("actor", "target", "timestamp", "row")))
    queries = build_queries(index, per_actor=0, seed=0)
    expected = baseline_results(prepared, config.baselines, config.eval).metrics["test"]
    assert len(queries["test"]) == 1077 and not queries["train"]
    assert ndcg_at_10(queries["test"], rule_score) == pytest.approx(expected["two_way_recency_frequency"]["ndcg@10"],
                                                                     abs=1e-12)
    # Any order of the contacts scores at most every contact target first.
    best = ndcg_at_10(queries["test"], lambda q: (np.arange(len(q.rule)) == q.target) * 1.0)
    share = np.mean([q.target >= 0 for q in queries["test"]])
    assert share <= best < share + 0.01  # a new contact counts only where the actor has few contacts


def test_a_query_reads_the_merged_stream_and_the_candidates_activity():
    # Actor 0 wrote to 1 (t=10) and 2 (t=30); 2 wrote to 0 at t=40; 3 wrote to 1 at t=45;
    # then 0 writes to 1 (t=50, its test event after a validation one at t=48 to 3).
    index = _index([(0, 1, 10), (0, 2, 30), (2, 0, 40), (3, 1, 45), (0, 3, 48), (0, 1, 50)])
    query = contact_query(index, actor=0, k=3, released="test")
    # Contacts: 1, 2 and 3 (the validation event is released for a test query).
    assert query.target == 0 and len(query.rule) == 3
    # Merged stream, newest last: 1 (t=10), 2 (30), 2 in (40), 3 (48): ages 3, 2, 1, 0.
    np.testing.assert_allclose(query.rule, [0.5**3, 0.5**2 + 0.5**1, 0.5**0])
    stream = _columns(("stream",))
    newest_flag = query.features[:, stream][:, 11]
    assert newest_flag.tolist() == [0, 0, 1]
    unanswered = query.features[:, _columns(("stream", "unanswered"))][:, 13]
    assert unanswered.tolist() == [0, 1, 0]  # 2's newest message reached the actor
    # Candidate 1's own activity: it received from 3 at t=45, 5 s before the query.
    activity = query.features[:, _columns(("stream", "unanswered", "activity"))][:, 15]
    assert activity[0] == pytest.approx(np.log1p(5 / 3600) / 5)
    assert sum(GROUP_WIDTHS.values()) == query.features.shape[1]


def test_the_ranker_learns_a_feature_that_marks_the_target():
    rng = np.random.default_rng(0)

    def query() -> ContactQuery:
        size = int(rng.integers(2, 12))
        features = rng.normal(size=(size, sum(GROUP_WIDTHS.values()))).astype(np.float32)
        target = int(rng.integers(size))
        features[target, 0] += 3.0  # the first stream feature points at the target
        return ContactQuery(features, np.zeros(size), np.zeros(size), target, 0)

    train, valid = [query() for _ in range(600)], [query() for _ in range(200)]
    columns = _columns(("stream",))
    net = fit_ranker(train, valid, columns, seed=0, epochs=3)
    assert ndcg_at_10(valid, valid_score(net, columns)) > 0.9
