"""Property tests: the same events written in another variant of a format (a byte order
mark, spaces around header names, gzip compression, a CSV without a header row, a parquet
directory whose files use different integer widths) read to exactly the canonical event
table, ID maps and action values of the plain file."""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from data.events import EventLog, load_events
from tests.conftest import data_config

BOM = "\ufeff"
ids = st.one_of(st.integers(0, 30), st.integers(-(2**31), 2**31 - 1))
rows = st.lists(st.tuples(ids, ids, st.integers(0, 3), st.integers(0, 2**40)), min_size=1, max_size=30)


def _write(name: str, text: str, compress: bool = False) -> Path:
    path = Path(tempfile.mkdtemp()) / name
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def _table(log: EventLog, row_offset: int = 0) -> tuple:
    """Everything preparation derives from the events; `row_offset` moves the file row of
    each event (a header line shifts the rows of the same events by one)."""
    events = log.events.with_columns(pl.col("row") + row_offset)
    return events.rows(), log.actor_ids.raw.to_list(), log.target_ids.raw.to_list(), log.action_values


def _read(path: Path, **overrides) -> tuple:
    return _table(load_events(data_config(path, **overrides)))


def _csv_text(events, header: str | None) -> str:
    body = "".join(f"{a},{t},{action},{ts}\n" for a, t, action, ts in events)
    return body if header is None else header + "\n" + body


@settings(max_examples=25, deadline=None)
@given(events=rows)
def test_csv_variants_read_to_the_plain_csv_table(events):
    plain = _read(_write("log.csv", _csv_text(events, "actor,target,action,timestamp")))
    spaced = _csv_text(events, " actor , target,action ,  timestamp")
    assert _read(_write("log.csv", BOM + _csv_text(events, "actor,target,action,timestamp"))) == plain
    assert _read(_write("log.csv", spaced)) == plain
    assert _read(_write("log.csv.gz", _csv_text(events, "actor,target,action,timestamp"), compress=True)) == plain
    assert _read(_write("log.csv.gz", BOM + spaced, compress=True)) == plain
    # Without a header every event sits one line higher in the file.
    headerless = load_events(data_config(_write("log.csv", _csv_text(events, None)), header=False))
    assert _table(headerless, row_offset=1) == plain


@settings(max_examples=25, deadline=None)
@given(events=rows)
def test_inter_variants_read_to_the_plain_inter_table(events):
    body = "".join(f"{a}\t{t}\t{action}\t{ts}\n" for a, t, action, ts in events)
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    plain = _read(_write("log.inter", header + body))
    assert _read(_write("log.inter", BOM + header + body)) == plain
    assert _read(_write("log.inter", " user_id:token \t item_id:token\trating:float \ttimestamp:float\n" + body)) == plain
    assert _read(_write("log.inter.gz", header + body, compress=True)) == plain


@settings(max_examples=25, deadline=None)
@given(events=rows)
def test_snap_variants_read_to_the_plain_snap_table(events):
    text = "# a comment\n" + "".join(f"{a} {t} {ts}\n" for a, t, _, ts in events)
    plain = _read(_write("log.txt", text))
    assert _read(_write("log.txt", BOM + text)) == plain
    assert _read(_write("log.txt.gz", text, compress=True)) == plain


INTEGER_TYPES = [pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32]


def _types_holding(values: list[int]) -> list[pl.DataType]:
    """The integer types (UInt64 aside: it has no lossless common type with signed ones)
    that hold every value."""
    low, high = min(values), max(values)
    return [t for t in INTEGER_TYPES if pl.Series([low, high]).cast(t, strict=False).null_count() == 0]


@settings(max_examples=25, deadline=None)
@given(events=rows, data=st.data())
def test_a_parquet_directory_of_mixed_integer_widths_reads_to_the_single_file_table(events, data):
    frame = pl.DataFrame(events, schema=["actor", "target", "action", "timestamp"], orient="row")
    directory = Path(tempfile.mkdtemp())
    frame.write_parquet(directory / "one.parquet")
    plain = _read(directory / "one.parquet")
    cuts = sorted(data.draw(st.lists(st.integers(0, frame.height), max_size=3)))
    parts = directory / "parts"
    parts.mkdir()
    for i, (start, end) in enumerate(zip([0, *cuts], [*cuts, frame.height])):
        part = frame.slice(start, end - start)
        # Each file stores each column in an integer type of its own that holds the file's values.
        types = {c: data.draw(st.sampled_from(_types_holding(part[c].to_list() or [0]))) for c in part.columns}
        part.cast(types).write_parquet(parts / f"part-{i}.parquet")
    assert _read(parts) == plain
