import numpy as np
import pytest

from data.batches import INCOMING_KEYS, BatchBuilder, BatchSpec
from data.incoming import Incoming
from data.sequences import Sequences, Split


def _messaging_log(num_people: int = 7, num_events: int = 120, seed: int = 0) -> Sequences:
    """A shared-ID-space log: people message people, with many equal timestamps."""
    rng = np.random.default_rng(seed)
    actor = rng.integers(0, num_people, num_events)
    target = rng.integers(0, num_people, num_events)
    timestamp = rng.integers(0, 40, num_events)
    order = np.lexsort((np.arange(num_events), timestamp, actor))
    actor, target, timestamp = actor[order], target[order], timestamp[order]
    starts = np.flatnonzero(np.r_[True, actor[1:] != actor[:-1]])
    return Sequences(
        actor=actor[starts].astype(np.int64),
        offsets=np.r_[starts, num_events].astype(np.int64),
        targets=target.astype(np.int64),
        actions=np.zeros(num_events, dtype=np.int32),
        timestamps=timestamp.astype(np.int64),
        num_targets=num_people,
        num_actors=num_people,
        num_actions=1,
    )


def _brute_force_window(seqs: Sequences, known: np.ndarray, receiver: int, before: int, max_len: int):
    sender = np.repeat(seqs.actor, seqs.lengths)
    rows = [
        (int(seqs.timestamps[i]), i, int(sender[i]))
        for i in range(len(seqs.targets))
        if known[i] and seqs.targets[i] == receiver and seqs.timestamps[i] < before
    ]
    rows.sort()
    return [(s, t) for t, _, s in rows[-max_len:]] if max_len else []


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_len", [0, 1, 3, 50])
def test_window_is_the_last_events_strictly_before_the_query_time(seed, max_len):
    seqs = _messaging_log(seed=seed)
    known = np.random.default_rng(seed + 10).random(len(seqs.targets)) < 0.8
    incoming = Incoming.from_sequences(seqs, known)
    receivers = np.repeat(np.arange(7), 6)
    before = np.tile(np.array([0, 1, 7, 20, 39, 100]), 7)
    flat, lengths = incoming.window(receivers, before, max_len)
    offsets = np.r_[0, np.cumsum(lengths)]
    for q, (receiver, time) in enumerate(zip(receivers, before)):
        got = [(int(incoming.sources[i]), int(incoming.timestamps[i])) for i in flat[offsets[q] : offsets[q + 1]]]
        assert got == _brute_force_window(seqs, known, receiver, time, max_len), (receiver, time)


def test_held_out_events_never_reach_the_queries_of_their_split():
    seqs = _messaging_log(seed=3)
    split = Split.leave_last_out(seqs)
    sender = np.repeat(seqs.actor, seqs.lengths)
    for name in ("valid", "test"):
        known = split.known_mask(seqs, name)
        incoming = Incoming.from_sequences(seqs, known)
        assert (~known).any()
        seen = set()
        for receiver in range(7):
            flat, _ = incoming.window(np.array([receiver]), np.array([10**9]), 10**6)
            seen |= {(int(incoming.sources[i]), receiver, int(incoming.timestamps[i])) for i in flat}
        # Every event seen is a known event, and every known event is seen.
        known_events = sorted((int(sender[i]), int(seqs.targets[i]), int(seqs.timestamps[i])) for i in np.flatnonzero(known))
        assert sorted(seen) == sorted(set(known_events)), name
        assert len(incoming.sources) == int(known.sum())


def test_batches_carry_the_incoming_window_of_each_query():
    seqs = _messaging_log(seed=4)
    incoming = Incoming.from_sequences(seqs)
    queries = Split.leave_last_out(seqs).queries(seqs, "test")
    builder = BatchBuilder(seqs, queries, BatchSpec(4, incoming_window=5), np.arange(7), incoming=incoming)
    rows = np.arange(len(queries))
    batch = builder.build(rows)
    assert batch.incoming is not None and list(batch.incoming.keys()) == list(INCOMING_KEYS)
    actors = seqs.actor[queries.sequence]
    times = seqs.timestamps[queries.position]
    flat, lengths = incoming.window(actors, times, 5)
    assert batch.incoming["incoming_source"].lengths().tolist() == lengths.tolist()
    assert batch.incoming["incoming_source"].values().tolist() == incoming.sources[flat].tolist()
    assert batch.incoming["incoming_timestamp"].values().tolist() == incoming.timestamps[flat].tolist()
    assert (batch.incoming["incoming_timestamp"].values().numpy() < np.repeat(times, lengths)).all()
    # Without incoming events (separate ID spaces, or turned off) batches carry none.
    assert BatchBuilder(seqs, queries, BatchSpec(4), np.arange(7)).build(rows).incoming is None
    # The spec and the events agree, or the builder says which one is missing.
    with pytest.raises(ValueError, match="incoming events missing"):
        BatchBuilder(seqs, queries, BatchSpec(4, incoming_window=5), np.arange(7))
    with pytest.raises(ValueError, match="incoming events given"):
        BatchBuilder(seqs, queries, BatchSpec(4), np.arange(7), incoming=incoming)
