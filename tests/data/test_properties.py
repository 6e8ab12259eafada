"""Property tests: any valid log round-trips through the ID mapping, the split adds up,
no event is lost."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from configs.schema import DataConfig
from data.events import load_events
from data.sequences import Sequences, Split

raw_ids = st.one_of(st.integers(-(2**62), 2**62), st.integers(0, 30))
events = st.lists(
    st.tuples(raw_ids, raw_ids, st.integers(0, 3), st.integers(0, 2**40)), min_size=1, max_size=60
)


def _write_csv(rows) -> Path:
    directory = Path(tempfile.mkdtemp())
    frame = pl.DataFrame(rows, schema=["actor", "target", "action", "timestamp"], orient="row")
    path = directory / "log.csv"
    frame.write_csv(path)
    return path


@settings(max_examples=60, deadline=None)
@given(rows=events, shared=st.booleans())
def test_any_valid_log_round_trips_through_the_id_mapping(rows, shared):
    log = load_events(DataConfig(path=str(_write_csv(rows)), shared_id_space=shared))
    assert log.num_events == len(rows)  # nothing dropped
    by_row = log.events.sort("row")
    actors = log.actor_ids.to_raw(by_row["actor"].to_numpy())
    targets = log.target_ids.to_raw(by_row["target"].to_numpy())
    assert actors == [r[0] for r in rows]
    assert targets == [r[1] for r in rows]
    assert by_row["timestamp"].to_list() == [r[3] for r in rows]
    # indices are contiguous
    assert set(log.events["actor"].to_list()) == set(range(len(set(actors)))) or shared


@settings(max_examples=60, deadline=None)
@given(rows=events)
def test_split_sizes_add_up_and_no_event_is_lost(rows):
    log = load_events(DataConfig(path=str(_write_csv(rows))))
    seqs = Sequences.from_event_log(log)
    split = Split.leave_last_out(seqs)
    train = split.train_mask(seqs)
    assert train.sum() + 2 * len(split.evaluated) == len(rows)
    valid, test = split.queries(seqs, "valid"), split.queries(seqs, "test")
    flat = np.concatenate([np.flatnonzero(train), valid.position, test.position])
    assert sorted(flat.tolist()) == list(range(len(rows)))  # every event in exactly one part
    # within every sequence, time never goes backwards
    for s in range(seqs.num_sequences):
        ts = seqs.timestamps[seqs.offsets[s] : seqs.offsets[s + 1]]
        assert (np.diff(ts) >= 0).all()
    assert (seqs.lengths[split.evaluated] >= 3).all()
