"""Readers: each format's good path and every kind of bad input named by file, line and field."""

from __future__ import annotations

import polars as pl
import pytest

from data.events import load_events
from data.readers import DataError
from tests.conftest import data_config


def _events(path, **overrides):
    return load_events(data_config(path, **overrides))


def test_snap_reads_fields_skips_comments_and_shares_ids(write):
    path = write("g.txt", "# SNAP header\n10 20 100\n\n20 10 50\n10 30 100\n")
    log = _events(path)
    assert log.shared_id_space
    assert log.actor_ids.raw.to_list() == [10, 20, 30]
    rows = log.events.select("actor", "target", "action", "timestamp", "row").rows()
    # sorted by (actor, timestamp, row): actor 10 has two events at t=100, file order kept
    assert rows == [(0, 1, 0, 100, 2), (0, 2, 0, 100, 5), (1, 0, 0, 50, 4)]
    assert log.action_values == ["<none>"]


def test_snap_without_timestamps_uses_row_order(write):
    log = _events(write("g.txt", "1 2\n1 3\n"))
    assert log.events["timestamp"].to_list() == [1, 2]
    assert not log.has_timestamps


def test_inter_reads_typed_header_and_maps_ratings_to_actions(write):
    text = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n7\t100\t5\t10\n7\t101\t1\t20\n8\t100\t3\t5\n"
    log = _events(write("x.inter", text))
    assert not log.shared_id_space
    assert log.action_values == ["1", "3", "5"]
    assert log.events.select("actor", "target", "action").rows() == [(0, 0, 2), (0, 1, 0), (1, 0, 1)]


def test_csv_with_named_columns_and_string_ids(write):
    text = "sender,receiver,kind,ts\nalice,bob,like,3\nbob,\"carol\",msg,4\n"
    config = dict(actor_column="sender", target_column="receiver", action_column="kind", timestamp_column="ts", id_type="str")
    log = _events(write("x.csv", text), **config)
    assert log.actor_ids.raw.to_list() == ["alice", "bob"]
    assert log.target_ids.to_raw(log.events["target"].to_numpy()) == ["bob", "carol"]
    assert log.action_values == ["like", "msg"]


def test_parquet_file_and_directory_give_the_same_table(tmp_path):
    frame = pl.DataFrame({"actor": [1, 1, 2], "target": [5, 6, 5], "timestamp": [1, 2, 3]})
    frame.write_parquet(tmp_path / "one.parquet")
    (tmp_path / "dir").mkdir()
    frame.slice(0, 2).write_parquet(tmp_path / "dir" / "a.parquet")
    frame.slice(2).write_parquet(tmp_path / "dir" / "b.parquet")
    single, many = _events(tmp_path / "one.parquet"), _events(tmp_path / "dir")
    assert single.events.equals(many.events)
    assert single.events.height == 3


def test_parquet_datetime_timestamps_become_seconds(tmp_path):
    import datetime as dt

    frame = pl.DataFrame({"actor": [1], "target": [2], "timestamp": [dt.datetime(1970, 1, 2)]})
    frame.write_parquet(tmp_path / "t.parquet")
    assert _events(tmp_path / "t.parquet").events["timestamp"].to_list() == [86400]


@pytest.mark.parametrize(
    ("name", "content", "overrides", "expected"),
    [
        ("g.txt", "1 2 3\nx 2 4\n", {}, r"g\.txt:2: field 1 \(SRC\) \(actor\): expected an integer ID"),
        ("g.txt", "1 2 3\n1 2 -4\n", {}, r"g\.txt:2: field 3 \(TS\) \(timestamp\): expected a non-negative"),
        ("g.txt", "1 2 3\n1 2 noon\n", {}, r"g\.txt:2: field 3 \(TS\).*got 'noon'"),
        ("g.txt", "1 2 3\n1 2 3 4\n2 3 4\n", {}, r"g\.txt:2: expected 3 fields \(SRC DST TS\), found 4"),
        ("g.txt", "1 2 3\n4 5 6\n7 8", {}, r"g\.txt:3: expected 3 fields.*found 2.*truncated"),
        ("g.txt", "1 2 3 4\n4 5 6\n", {}, r"g\.txt:1: expected 3 fields \(SRC DST TS\), found 4"),
        ("g.txt", "1\n2 3 4 5\n", {}, r"g\.txt:1: expected 2 or 3 fields \(SRC DST \[TS\]\), found 1"),
        ("g.txt", "", {}, r"g\.txt: the file is empty"),
        ("g.txt", "# only a comment\n", {}, r"g\.txt: no events"),
        ("g.txt", b"1 2 3\n\xff\xfe 2 3\n", {}, r"g\.txt:2: the line is not valid UTF-8"),
        ("g.txt", "1 99999999999999999999999 3\n", {}, r"g\.txt:1: field 2 \(DST\) \(target\): expected an integer"),
        ("x.inter", "user_id:token\titem_id:token\n1\t2\n3\n", {}, r"x\.inter:3: expected 2 tab-separated fields"),
        ("x.inter", "user:token\titem_id:token\n1\t2\n", {}, r"x\.inter: missing column 'user_id'.*user, item_id"),
        ("x.csv", "actor,target\n1,2,3\n", {}, r"x\.csv:2: expected 2 comma-separated fields"),
        ("x.csv", "actor,dst\n1,2\n", {}, r"x\.csv: missing column 'target'"),
        ("x.csv", "actor,target\n1,2\n", {"timestamp_column": "when"}, r"missing column 'when'"),
        ("x.csv", "actor,target\n1,2\n\"a\nb\",3\n", {}, r"x\.csv:3: column 'actor' \(actor\): expected an integer"),
    ],
)
def test_bad_input_names_file_line_and_field(write, name, content, overrides, expected):
    with pytest.raises(DataError, match=expected):
        _events(write(name, content), **overrides)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        _events(tmp_path / "nope.txt")


def test_drop_mode_skips_bad_rows_and_reports_the_count(write):
    path = write("g.txt", "1 2 3\nx 2 4\n1 3 -1\n1 2 3 4\n2 1 5\n")
    log = _events(path, on_bad_rows="drop")
    assert log.num_events == 2
    assert log.report["rows_dropped"] == 3
    assert log.report["dropped_by_reason"] == {"wrong number of fields": 1, "bad actor": 1, "bad timestamp": 1}


def test_drop_mode_drops_a_corrupted_first_line(write):
    # The layout comes from the first line with 2 or 3 fields, not from a bad first line.
    log = _events(write("g.txt", "1 2 3 4\n4 5 6\n5 4 7\n"), on_bad_rows="drop")
    assert log.num_events == 2
    assert log.report["dropped_by_reason"] == {"wrong number of fields": 1}


def test_duplicates_are_kept_unless_asked(write):
    path = write("g.txt", "1 2 3\n1 2 3\n")
    assert _events(path).num_events == 2
    log = _events(path, drop_duplicate_events=True)
    assert log.num_events == 1 and log.report["duplicates_dropped"] == 1
