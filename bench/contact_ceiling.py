"""How far can re-scoring the actor's contacts go, and which inputs would move it? A
learned ranker over each query's contacts, with feature groups added one at a time, on a
shared-ID-space log under the benchmark protocol (../shared/BENCHMARK.md).

    .venv/bin/python bench/contact_ceiling.py                 # CollegeMsg (~2.5 min)
    .venv/bin/python bench/contact_ceiling.py --seeds 1 --per-actor 10   # quicker
    .venv/bin/python bench/contact_ceiling.py --groups 1 --tag late -- data.path=runs/derived/collegemsg-late.txt

Why: the issue-22 bar asks the model for the two-way recency-frequency rule plus 5%
(CollegeMsg test NDCG@10 >= 0.714). The model's score of a contact is its re-scorer's
(models/repeat.py) over features of the pair's two-way stream. This bench measures what a
ranker over those features can reach at best, and what each further input adds, without
training the full model: each query's candidates are the actor's contacts (the merged
stream of its own earlier events and the released events that reached it before the
query's time, as the rule reads them), ranked by a small MLP trained with a softmax over
them (training events as queries), chosen on validation NDCG@10, reported on test.
Every other candidate ranks after the contacts by popularity, as the rule ranks it, so a
query whose target is a new contact scores only when the actor has few contacts.

Feature groups (each adds to the ones before it):
- `stream`: what the re-scorer reads of a pair: decayed counts at half-lives 1/4/16/64
  over the merged stream, the count, events and hours since the last one, each
  direction's count and hours since its last, whether it is the newest, the popularity;
- `unanswered`: whether the pair's newest message reached the actor (not answered yet),
  and the share of the pair's messages that reached it;
- `idle`: the actor's idle time (hours since its own newest event of either direction):
  read from the query alone, so the model could have it without anyone else's events;
- `activity`: the candidate's own recent activity with anyone (hours since its last
  event, its events in the last hour and day, all its events);
- `co_occurrence`: how many of the actor's 10 newest contacts are among the candidate's
  20 newest partners (DyGFormer's neighbour co-occurrence, at its simplest);
- `candidate_view`: the actor as the candidate sees it: the candidate's events since it
  last met the actor, and the actor's decayed count in the candidate's stream.
`activity`, `co_occurrence` and `candidate_view` read other people's events, which the
rule and the model do not: the released events before the query's time, as the protocol
allows.

Also reported: the rule itself computed here (it must equal trainer/results.py's figure:
the harness follows the protocol), the share of test queries whose target is a contact,
and the best NDCG@10 any order of the contacts could reach (every contact target first).
Writes bench/results/contact_ceiling_<data>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_result  # noqa: E402
from configs.loading import load_config  # noqa: E402
from data.prepare import prepare  # noqa: E402
from trainer.main import CONFIG_DIR  # noqa: E402
from trainer.results import baseline_results  # noqa: E402

GROUPS = ("stream", "unanswered", "idle", "activity", "co_occurrence", "candidate_view")
GROUP_WIDTHS = {"stream": 13, "unanswered": 2, "idle": 1, "activity": 4, "co_occurrence": 1, "candidate_view": 3}
_HALF_LIVES = (1.0, 4.0, 16.0, 64.0)


@dataclass
class ContactQuery:
    """One query's contacts: features [C, F] (every group, in GROUPS order), the rule's
    score, popularity, and the true target's index among them (-1: not a contact)."""

    features: np.ndarray
    rule: np.ndarray
    popularity: np.ndarray
    target: int
    non_contact_rank: int  # the target's rank among the non-contacts by popularity (when not a contact)


class EventIndex:
    """The log's events and its leave-last-out split (BENCHMARK.md), with the lookups the
    features need: each actor's own events, the events that reached each person, and each
    person's events in either role, over a released set."""

    def __init__(self, actor: np.ndarray, target: np.ndarray, timestamp: np.ndarray, row: np.ndarray) -> None:
        self.actor, self.target, self.timestamp, self.row = actor, target, timestamp, row
        self.num_people = int(max(actor.max(), target.max())) + 1
        order = np.lexsort((row, timestamp, actor))
        sorted_actor = actor[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_actor)) + 1]
        lengths = np.diff(np.r_[starts, len(actor)])
        position, count = np.empty(len(actor), np.int64), np.empty(len(actor), np.int64)
        position[order] = np.arange(len(actor)) - np.repeat(starts, lengths)
        count[order] = np.repeat(lengths, lengths)
        evaluated = count >= 3
        self.is_test = evaluated & (position == count - 1)
        self.is_valid = evaluated & (position == count - 2)
        self.own_order = order  # events by (actor, time, row)
        self.own_start = np.searchsorted(sorted_actor, np.arange(self.num_people))
        self.own_stop = np.searchsorted(sorted_actor, np.arange(self.num_people), side="right")
        self.released = {"valid": ~self.is_test & ~self.is_valid, "test": ~self.is_test}
        self.incoming = {split: self._by(target, mask) for split, mask in self.released.items()}
        self.activity = {split: self._either_role(mask) for split, mask in self.released.items()}
        self.popularity = {split: np.bincount(target[mask], minlength=self.num_people)
                           for split, mask in self.released.items()}
        self.candidates = np.unique(target)
        self.is_candidate = np.zeros(self.num_people, dtype=bool)
        self.is_candidate[self.candidates] = True

    def _by(self, key: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        events = np.flatnonzero(mask)
        events = events[np.lexsort((self.row[events], self.timestamp[events], key[events]))]
        keys = key[events]
        people = np.arange(self.num_people)
        return events, np.searchsorted(keys, people), np.searchsorted(keys, people, side="right")

    def _either_role(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(times, partners, start, stop): each person's released events as sender or
        receiver, in time order."""
        person = np.r_[self.actor[mask], self.target[mask]]
        times = np.r_[self.timestamp[mask], self.timestamp[mask]]
        partner = np.r_[self.target[mask], self.actor[mask]]
        order = np.lexsort((times, person))
        person, people = person[order], np.arange(self.num_people)
        return times[order], partner[order], np.searchsorted(person, people), np.searchsorted(person, people, side="right")

    def own_events(self, actor: int) -> np.ndarray:
        return self.own_order[self.own_start[actor] : self.own_stop[actor]]


def contact_query(index: EventIndex, actor: int, k: int, released: str) -> ContactQuery | None:
    """The query of `actor`'s k-th event (0-based, in its time order), its contacts and
    their features; None when the actor has no contact before it."""
    own_events = index.own_events(actor)
    event = own_events[k]
    now, true = index.timestamp[event], index.target[event]
    own = own_events[:k]
    events, start, stop = index.incoming[released]
    reached = events[start[actor] : stop[actor]]
    reached = reached[index.timestamp[reached] < now]
    if len(own) + len(reached) == 0:
        return None
    who = np.r_[index.target[own], index.actor[reached]]
    times = np.r_[index.timestamp[own], index.timestamp[reached]]
    rows = np.r_[index.row[own], index.row[reached]]
    came_in = np.r_[np.zeros(len(own)), np.ones(len(reached))]
    # Time order; at one second an incoming event counts as the newer (models/repeat.py).
    order = np.lexsort((came_in, rows, times))
    who, times, came_in = who[order], times[order], came_in[order]
    length = len(who)
    age = (length - 1 - np.arange(length)).astype(float)
    people, pair = np.unique(who, return_inverse=True)
    size = len(people)

    def per_pair(values: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
        if where is None:
            return np.bincount(pair, weights=values, minlength=size)
        return np.bincount(pair[where], weights=values[where], minlength=size)

    def hours_since(last: np.ndarray) -> np.ndarray:
        return np.log1p(np.clip(now - last, 0, 1e12) / 3600.0) / 5.0

    decayed = [per_pair(0.5 ** (age / h)) for h in _HALF_LIVES]
    count = per_pair(np.ones(length))
    newest_age = np.full(size, np.inf)
    np.minimum.at(newest_age, pair, age)
    last_time = np.full(size, -1e12)
    np.maximum.at(last_time, pair, times)
    directions = []
    for incoming in (0, 1):
        mine = came_in == incoming
        last = np.full(size, -1e12)
        np.maximum.at(last, pair[mine], times[mine])
        directions += [np.log1p(per_pair(np.ones(length), mine)), hours_since(last)]
    newest_event = np.zeros(size, dtype=np.int64)
    np.maximum.at(newest_event, pair, np.arange(length))
    newest_incoming = came_in[newest_event]
    popularity = index.popularity[released][people]
    stream = np.c_[np.stack(decayed, 1), np.log1p(count), np.log1p(newest_age), hours_since(last_time),
                   np.stack(directions, 1), (newest_age == 0).astype(float), np.log1p(popularity) / 5.0]
    unanswered = np.c_[newest_incoming, per_pair(came_in) / count]

    times_of, partners_of, start_of, stop_of = index.activity[released]
    recent_contacts = set(who[-10:].tolist())
    activity, co_occurrence, candidate_view = [], [], []
    for person in people.tolist():
        their_times = times_of[start_of[person] : stop_of[person]]
        before = int(np.searchsorted(their_times, now))  # strictly before the query's time
        their_partners = partners_of[start_of[person] : start_of[person] + before]
        last = their_times[before - 1] if before else -1e12
        activity.append([
            np.log1p(max(now - last, 0) / 3600.0) / 5.0,
            np.log1p(before - np.searchsorted(their_times, now - 3600)),
            np.log1p(before - np.searchsorted(their_times, now - 86400)),
            np.log1p(before),
        ])
        co_occurrence.append(len(recent_contacts & set(their_partners[-20:].tolist())))
        with_actor = np.flatnonzero(their_partners == actor)
        since = before - 1 - with_actor[-1] if len(with_actor) else before
        their_age = (before - 1 - with_actor).astype(float)
        candidate_view.append([np.log1p(since)] + [float(np.sum(0.5 ** (their_age / h))) for h in (1.0, 4.0)])
    idle = np.full((size, 1), np.log1p(max(now - times[-1], 0) / 3600.0) / 5.0)
    features = np.c_[stream, unanswered, idle, np.array(activity), np.log1p(co_occurrence)[:, None],
                     np.array(candidate_view)]
    # A sender who never receives is no candidate: it reads as a feature of nobody's rank.
    keep = index.is_candidate[people]
    features, people, decayed[0], popularity = features[keep], people[keep], decayed[0][keep], popularity[keep]
    hit = np.flatnonzero(people == true)
    non_contact_rank = 0
    if not len(hit):
        non_contact_rank = _rank_after_contacts(index, people, true, released)
    return ContactQuery(features.astype(np.float32), decayed[0], popularity, int(hit[0]) if len(hit) else -1,
                        non_contact_rank)


def _columns(groups: tuple[str, ...]) -> np.ndarray:
    bounds = np.cumsum([0] + [GROUP_WIDTHS[g] for g in GROUPS])
    return np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i, g in enumerate(GROUPS) if g in groups])


def ndcg_at_10(queries: list[ContactQuery], score) -> float:
    """Test NDCG@10 over every query: a contact target ranks among the contacts by `score`
    (ties against it), a new one after all of them."""
    total = 0.0
    for q in queries:
        if q.target >= 0:
            s = score(q)
            rank = int(np.sum(s >= s[q.target]))
        else:
            rank = len(q.rule) + q.non_contact_rank
        if rank <= 10:
            total += 1.0 / np.log2(rank + 1)
    return total / len(queries)


def rule_score(q: ContactQuery) -> np.ndarray:
    """The two-way rule at half-life 1: the decayed count, ties by popularity, as a dense
    rank of the (count, popularity) pairs (equal pairs tie)."""
    return np.unique(np.c_[q.rule, q.popularity], axis=0, return_inverse=True)[1].reshape(-1).astype(float)


def fit_ranker(train: list[ContactQuery], valid: list[ContactQuery], columns: np.ndarray, seed: int,
               epochs: int = 8) -> nn.Module:
    """An MLP score per contact, trained with a softmax over each query's contacts; the
    epoch with the best validation NDCG@10 is kept."""
    torch.manual_seed(seed)
    usable = [q for q in train if q.target >= 0]
    net = nn.Sequential(nn.Linear(len(columns), 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    best, best_state = -1.0, None
    for _ in range(epochs):
        net.train()
        order = rng.permutation(len(usable))
        for lo in range(0, len(order), 64):
            batch = [usable[i] for i in order[lo : lo + 64]]
            width = max(len(q.rule) for q in batch)
            x = torch.zeros(len(batch), width, len(columns))
            valid_mask = torch.zeros(len(batch), width, dtype=torch.bool)
            for i, q in enumerate(batch):
                x[i, : len(q.rule)] = torch.from_numpy(q.features[:, columns])
                valid_mask[i, : len(q.rule)] = True
            logits = net(x).squeeze(-1).masked_fill(~valid_mask, float("-inf"))
            loss = nn.functional.cross_entropy(logits, torch.tensor([q.target for q in batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        score = valid_score(net, columns)
        value = ndcg_at_10(valid, score)
        if value > best:
            best, best_state = value, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    return net


def valid_score(net: nn.Module, columns: np.ndarray):
    net.eval()

    def score(q: ContactQuery) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(q.features[:, columns])).squeeze(-1).double().numpy()
    return score


def build_queries(index: EventIndex, per_actor: int, seed: int) -> dict[str, list[ContactQuery]]:
    """Training queries (at most `per_actor` of each actor's training events, over the
    training events), and the validation and test queries of every evaluated actor."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[ContactQuery]] = {"train": [], "valid": [], "test": []}
    for actor in range(index.num_people):
        n = index.own_stop[actor] - index.own_start[actor]
        if n == 0:
            continue
        train_end = n - 2 if n >= 3 else n
        ks = np.arange(1, train_end)
        if len(ks) > per_actor:
            ks = rng.choice(ks, per_actor, replace=False)
        for k in ks.tolist():
            q = contact_query(index, actor, k, "valid")
            if q is not None:
                out["train"].append(q)
        if n >= 3:
            for split, k in (("valid", n - 2), ("test", n - 1)):
                q = contact_query(index, actor, k, split)
                out[split].append(q if q is not None else _no_contacts(index, actor, k, split))
    return out


def _rank_after_contacts(index: EventIndex, contacts: np.ndarray, true: int, released: str) -> int:
    """A new contact's rank among the candidates that are not contacts, by popularity,
    ties against it (BENCHMARK.md): it ranks after every contact."""
    popularity = index.popularity[released]
    others = np.setdiff1d(index.candidates, contacts)
    return int(np.sum(popularity[others] >= popularity[true]))


def _no_contacts(index: EventIndex, actor: int, k: int, released: str) -> ContactQuery:
    """A query without any contact: its target ranks by popularity alone."""
    event = index.own_events(actor)[k]
    rank = _rank_after_contacts(index, np.zeros(0, dtype=np.int64), int(index.target[event]), released)
    width = sum(GROUP_WIDTHS.values())
    return ContactQuery(np.zeros((0, width), np.float32), np.zeros(0), np.zeros(0), -1, rank)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="collegemsg", help="a config in configs/ whose log has one ID space")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--per-actor", type=int, default=30, help="training queries per actor, at most")
    parser.add_argument("--groups", type=int, default=len(GROUPS), help="the first N feature groups only")
    parser.add_argument("--tag", default="", help="results file contact_ceiling_<data>_<tag>.json (for overrides)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (after --)")
    args = parser.parse_args()
    started = time.perf_counter()
    config = load_config(CONFIG_DIR / f"{args.data}.yaml", args.overrides)
    prepared = prepare(config.data)
    if not prepared.log.shared_id_space:
        raise SystemExit(f"{args.data}: actors and targets are not one ID space; there are no incoming contacts")
    events = prepared.log.events
    index = EventIndex(*(events[c].to_numpy() for c in ("actor", "target", "timestamp", "row")))
    queries = build_queries(index, args.per_actor, seed=0)
    test = queries["test"]
    baselines = baseline_results(prepared, config.baselines, config.eval)
    chosen = baselines.half_lives["two_way_recency_frequency"]["half_life_events"]
    if float(chosen) != 1.0:
        raise SystemExit(f"{args.data}: the two-way rule's half-life is {chosen}; this harness computes it at 1")
    reference = baselines.metrics["test"]["two_way_recency_frequency"]
    result = {
        "data": args.data,
        "overrides": args.overrides,
        "queries": {split: len(q) for split, q in queries.items()},
        "test_target_is_contact": float(np.mean([q.target >= 0 for q in test])),
        "test_ndcg@10": {
            "rule_here": ndcg_at_10(test, rule_score),
            "rule_trainer_results": reference["ndcg@10"],
            "contacts_in_best_order": ndcg_at_10(test, lambda q: (np.arange(len(q.rule)) == q.target) * 1.0),
        },
        "rankers": {},
    }
    print(f"queries {result['queries']}; rule here {result['test_ndcg@10']['rule_here']:.4f}, "
          f"trainer.results {reference['ndcg@10']:.4f}", flush=True)
    for i in range(min(args.groups, len(GROUPS))):
        groups = GROUPS[: i + 1]
        columns = _columns(groups)
        runs = []
        for seed in range(args.seeds):
            net = fit_ranker(queries["train"], queries["valid"], columns, seed)
            runs.append({"valid": ndcg_at_10(queries["valid"], valid_score(net, columns)),
                         "test": ndcg_at_10(test, valid_score(net, columns))})
        name = "+".join(groups)
        result["rankers"][name] = {"test_ndcg@10": [r["test"] for r in runs], "valid_ndcg@10": [r["valid"] for r in runs],
                                   "test_mean": float(np.mean([r["test"] for r in runs]))}
        print(f"{name}: test NDCG@10 {result['rankers'][name]['test_mean']:.4f} "
              "(" + ", ".join(f"{r['test']:.4f}" for r in runs) + ")", flush=True)
    result["seconds"] = time.perf_counter() - started
    print(f"wrote {write_result(f'contact_ceiling_{args.data}' + (f'_{args.tag}' if args.tag else ''), result)}")


if __name__ == "__main__":
    main()
