"""Readers: each format's good path and every kind of bad input named by file, line and field."""

from __future__ import annotations

import gzip
import json
import logging
import re

import polars as pl
import pytest

from data.dataset import PreparedDataset
from data.events import load_events
from data.prepare import prepare
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
        ("g.txt", "1 2 3\n1 2 -4\n", {}, r"g\.txt:2: field 3 \(TS\) \(timestamp\): expected a number of seconds in \[0, 2\^62\)"),
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


# ------------------------ logs as users ship them: empty, compressed, headerless, mixed


def _one_line_error(path, **overrides) -> str:
    with pytest.raises(DataError) as error:
        _events(path, **overrides)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("x.csv", "actor,target\n", r"x\.csv: no events after the header line"),
        ("x.csv.gz", gzip.compress(b"actor,target\n"), r"x\.csv\.gz: no events after the header line"),
        ("x.inter", "user_id:token\titem_id:token\n", r"x\.inter: no events after the header line"),
        ("g.txt", "% comment\n\n", r"g\.txt: no events"),
        ("g.txt.gz", gzip.compress(b""), r"g\.txt\.gz: the file is empty"),
    ],
)
def test_a_log_without_events_is_one_line(write, name, content, expected):
    assert re.search(expected, _one_line_error(write(name, content)))


def test_a_parquet_log_of_zero_rows_is_one_line_before_any_sequence_is_built(tmp_path):
    pl.DataFrame(schema={"actor": pl.Int64, "target": pl.Int64}).write_parquet(tmp_path / "e.parquet")
    with pytest.raises(DataError, match=r"e\.parquet: no events; expected at least one row$"):
        prepare(data_config(tmp_path / "e.parquet"))


def _parquet_dir(tmp_path, *frames: pl.DataFrame):
    directory = tmp_path / "logs"
    directory.mkdir()
    for name, frame in zip("abc", frames):
        frame.write_parquet(directory / f"{name}.parquet")
    return directory


def test_a_parquet_directory_widens_integer_columns_losslessly(tmp_path):
    directory = _parquet_dir(
        tmp_path,
        pl.DataFrame({"actor": [1, 2], "target": [5, 6]}, schema={"actor": pl.Int32, "target": pl.UInt32}),
        pl.DataFrame({"actor": [2**40], "target": [-1]}, schema={"actor": pl.Int64, "target": pl.Int8}),
    )
    log = _events(directory)
    assert log.actor_ids.raw.to_list() == [1, 2, 2**40] and log.target_ids.raw.to_list() == [-1, 5, 6]


@pytest.mark.parametrize(
    ("types", "expected"),
    [
        ((pl.Int64, pl.String), r"logs/b\.parquet: column 'actor' is String, but \S*logs/a\.parquet has Int64;"),
        ((pl.Int64, pl.UInt64), r"logs/b\.parquet: column 'actor' is UInt64, but \S*logs/a\.parquet has Int64;"),
        ((pl.Float64, pl.Int64), r"logs/b\.parquet: column 'actor' is Int64, but \S*logs/a\.parquet has Float64;"),
    ],
)
def test_parquet_files_of_types_that_do_not_widen_name_both_files_and_the_column(tmp_path, types, expected):
    first, second = (pl.DataFrame({"actor": [1], "target": [2]}).cast({"actor": t}) for t in types)
    assert re.search(expected, _one_line_error(_parquet_dir(tmp_path, first, second)))


def test_a_parquet_file_missing_a_column_of_the_data_set_is_named(tmp_path):
    directory = _parquet_dir(
        tmp_path,
        pl.DataFrame({"actor": [1], "target": [2], "timestamp": [3]}),
        pl.DataFrame({"actor": [1], "target": [2]}),
    )
    message = _one_line_error(directory)
    assert re.search(r"logs/b\.parquet: missing column 'timestamp' for the timestamp, which \S*logs/a\.parquet has", message)


def test_an_unreadable_parquet_file_of_a_directory_is_named(tmp_path):
    directory = _parquet_dir(tmp_path, pl.DataFrame({"actor": [1], "target": [2]}))
    (directory / "b.parquet").write_bytes(b"not parquet")
    assert re.search(r"logs/b\.parquet: not a readable parquet file", _one_line_error(directory))


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("x.csv", "\ufeffactor,target,timestamp\n1,2,3\n"),
        ("x.csv", "actor, target , timestamp\n1, 2,3\n"),
        ("x.csv", "\ufeff actor ,target,timestamp \n1,2,3\n"),
        ("x.inter", "\ufeffuser_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n"),
        ("x.inter", "user_id:token \t item_id :token\ttimestamp:float\n1\t2\t3\n"),
    ],
)
def test_a_byte_order_mark_and_spaces_around_header_names_are_not_part_of_the_names(write, name, content):
    log = _events(write(name, content))
    assert log.events.select("timestamp").item() == 3 and log.actor_ids.raw.to_list() == [1]


@pytest.mark.parametrize(
    ("name", "text", "overrides"),
    [
        ("x.csv.gz", "actor,target,timestamp\n1,2,3\n1,3,4\n", {}),
        ("x.csv.gz", "actor,target,timestamp\n1,2,3\n1,3,4\n", {"format": "csv"}),
        ("x.gz", "actor,target,timestamp\n1,2,3\n1,3,4\n", {"format": "csv"}),
        ("x.inter.gz", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t3\t4\n", {}),
        ("x.txt.gz", "1 2 3\n1 3 4\n", {}),
    ],
)
def test_gzip_compressed_text_logs_read_like_the_plain_file(write, name, text, overrides):
    log = _events(write(name, gzip.compress(text.encode())), **overrides)
    assert log.events["timestamp"].to_list() == [3, 4]


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("x.csv.gz", "actor,target\n1,2\n1,2,3\n", r"x\.csv\.gz:3: expected 2 comma-separated fields"),
        ("x.csv.gz", "actor,target\n\"1\n\",2\n1,x\n", r"x\.csv\.gz:4: column 'target' \(target\): expected an integer"),
        ("x.inter.gz", "user_id:token\titem_id:token\n1\t2\n1\tx\n", r"x\.inter\.gz:3: column 'item_id'"),
        ("x.txt.gz", "# c\n1 2\n1 x\n", r"x\.txt\.gz:3: field 2 \(DST\)"),
    ],
)
def test_errors_in_gzip_compressed_logs_name_the_right_line(write, name, text, expected):
    assert re.search(expected, _one_line_error(write(name, gzip.compress(text.encode()))))


def test_a_truncated_gzip_log_is_one_line(write):
    data = gzip.compress("".join(f"{i} {i + 1} {i}\n" for i in range(20000)).encode())
    assert re.search(r"x\.txt\.gz: not a readable gzip file", _one_line_error(write("x.txt.gz", data[: len(data) // 2])))


@pytest.mark.parametrize(
    ("text", "fields", "timestamps", "actions"),
    [
        ("1,2\n1,3\n", ("actor", "target"), [1, 2], ["<none>"]),
        ("1,2,30\n1,3,40\n", ("actor", "target", "timestamp"), [30, 40], ["<none>"]),
        ("5,19,4,1000098\n5,7,3,1000099\n", ("actor", "target", "action", "timestamp"), [1000098, 1000099], ["3", "4"]),
    ],
)
def test_a_headerless_csv_reads_its_columns_by_position(write, text, fields, timestamps, actions):
    log = _events(write("x.csv", text), header=False)
    assert log.events["timestamp"].to_list() == timestamps and log.action_values == actions
    assert log.has_timestamps == ("timestamp" in fields) and log.has_actions == ("action" in fields)
    assert log.events["row"].to_list() == [1, 2]


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("1,2,3\n1,2\n", {}, r"x\.csv:2: expected 3 comma-separated fields \(actor, target, timestamp; data\.header=false\)"),
        ("1,2,3\n1,x,4\n", {}, r"x\.csv:2: column 2 \(target\): expected an integer"),
        ("1,2,3,4,5\n", {}, r"x\.csv:1: expected 2 to 4 comma-separated fields .*found 5"),
    ],
)
def test_a_headerless_csv_names_the_line_and_position_of_bad_input(write, text, overrides, expected):
    assert re.search(expected, _one_line_error(write("x.csv", text), header=False, **overrides))


def test_a_headerless_csv_drops_a_corrupted_first_row_in_drop_mode(write):
    log = _events(write("x.csv", "1,2,3,4,5\n1,2,3\n1,3,4\n"), header=False, on_bad_rows="drop")
    assert log.events["timestamp"].to_list() == [3, 4] and log.report["rows_dropped"] == 1


def test_a_header_row_of_numbers_suggests_reading_without_a_header(write):
    message = _one_line_error(write("x.csv", "5,19,4,1000098\n6,7,3,100\n"))
    assert "missing column 'actor'" in message and "data.header=false" in message
    assert "data.header" not in _one_line_error(write("y.csv", "src,dst\n1,2\n"))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"header": False, "format": "inter"}, r"data\.header: only csv logs"),
        ({"header": False, "actor_column": "src"}, r"data\.header: .*positional.*data\.actor_column"),
    ],
)
def test_header_false_is_refused_where_it_cannot_apply(overrides, expected):
    with pytest.raises(ValueError, match=expected):
        data_config("x.csv", **overrides)


def test_header_false_on_a_log_detected_as_another_format_is_one_line(write):
    assert "data.header=false applies to csv logs only" in _one_line_error(write("g.txt", "1 2\n"), header=False)


def test_absent_time_and_action_columns_are_warned_about_naming_lookalikes(write, caplog):
    path = write("x.csv", "actor,target,time,rating\n1,2,30,5\n1,3,20,4\n")
    with caplog.at_level(logging.WARNING, logger="data.readers"):
        log = _events(path)
    messages = [r.getMessage() for r in caplog.records if r.name == "data.readers"]
    assert messages == [
        f"{path}: no action column ('action'); every event has the same action type. "
        "Column 'rating' looks like one: data.action_column=rating uses it",
        f"{path}: no timestamp column ('timestamp'); events are ordered by row. "
        "Column 'time' looks like one: data.timestamp_column=time uses it",
    ]
    assert not log.has_timestamps and not log.has_actions
    assert log.events["timestamp"].to_list() == [2, 3]  # row order, not the `time` column


def test_a_log_with_time_and_actions_warns_of_nothing(write, caplog):
    with caplog.at_level(logging.WARNING, logger="data.readers"):
        log = _events(write("x.csv", "actor,target,action,timestamp\n1,2,5,30\n"))
    assert not [r for r in caplog.records if r.name == "data.readers"]
    assert log.has_timestamps and log.has_actions


def test_has_timestamps_and_has_actions_reach_the_summary_and_survive_saving(write, tmp_path):
    prepared = prepare(data_config(write("x.csv", "actor,target,timestamp\n1,2,3\n1,3,4\n1,4,5\n")), tmp_path / "out")
    assert prepared.summary()["has_timestamps"] is True and prepared.summary()["has_actions"] is False
    loaded = PreparedDataset.open(tmp_path / "out").event_log()
    assert loaded.has_timestamps and not loaded.has_actions


@pytest.mark.parametrize("cell", ["nan", "NaN", "inf", "", "  "])
@pytest.mark.parametrize("fmt", ["csv", "inter"])
def test_a_missing_action_is_an_error_naming_the_line_or_a_dropped_row(write, fmt, cell):
    if fmt == "csv":
        path = write("x.csv", f"actor,target,action\n1,2,like\n1,3,{cell}\n1,4,7\n")
    else:
        path = write("x.inter", f"user_id:token\titem_id:token\trating:float\n1\t2\t5\n1\t3\t{cell}\n1\t4\t7\n")
    assert re.search(r"x\.(csv|inter):3: column '(action|rating)' \(action\): expected an action type", _one_line_error(path))
    log = _events(path, on_bad_rows="drop")
    assert log.report["dropped_by_reason"] == {"bad action": 1} and "nan" not in [v.lower() for v in log.action_values]


@pytest.mark.parametrize("value", [float("nan"), None])
def test_a_missing_parquet_action_is_an_error_naming_the_row(tmp_path, value):
    pl.DataFrame({"actor": [1, 1], "target": [2, 3], "action": [1.0, value]}).write_parquet(tmp_path / "a.parquet")
    message = _one_line_error(tmp_path / "a.parquet")
    assert re.search(r"a\.parquet: row 2: column 'action' \(action\): expected an action type", message)


@pytest.mark.parametrize(
    ("stored", "ok"),
    [("4611686018427387903", True), ("4611686018427387904", False), ("9.22e18", False), ("9223372036854775807", False)],
)
def test_timestamps_are_limited_to_2_to_the_62_and_the_error_says_so(write, tmp_path, stored, ok):
    path = write("g.txt", f"1 2 {stored}\n")
    frame = pl.DataFrame({"actor": [1], "target": [2], "timestamp": [int(float(stored)) if "e" in stored else int(stored)]})
    frame.write_parquet(tmp_path / "t.parquet")
    for source in (path, tmp_path / "t.parquet"):
        if ok:
            assert _events(source).events["timestamp"].to_list() == [2**62 - 1]
        else:
            assert "expected a number of seconds in [0, 2^62)" in _one_line_error(source)
