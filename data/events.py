"""Raw fields -> the canonical event table, with checked types and contiguous IDs.

The canonical table (polars), sorted by `(actor, timestamp, row)`:

    actor      int64   contiguous index of the actor
    target     int64   contiguous index of the target
    action     int32   contiguous index of the action type (0 when the log has none)
    timestamp  int64   seconds (the row number when the log has no time)
    row        int64   1-based line (text) or row (parquet) in the original file

Raw IDs map to indices in sorted order of the raw values (`rank("dense")`), one
vocabulary for actors and targets when they share an ID space. The vocabularies
are kept (`IdMap`) and written into the prepared dataset (data/dataset.py), so
predictions map back.
"""

from __future__ import annotations

from collections.abc import Callable

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from configs.schema import DataConfig
from data.readers import DataError, RawLog, read_log

log = logging.getLogger(__name__)

_INT_TYPES = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)
_FLOAT_TYPES = (pl.Float32, pl.Float64)


class IdMap:
    """Raw IDs in index order: `raw[i]` is the raw ID of index i. `IdMap.stored` reads
    them from a file the first time they are asked for: a training run needs only the
    vocabulary's size, and 1e7 raw IDs are 80 MB on every rank."""

    def __init__(self, raw: pl.Series | None, size: int | None = None, read: Callable[[], pl.Series] | None = None) -> None:
        """`raw` in memory, or (`raw` None) `size` IDs that `read` returns when asked."""
        self._raw, self._read = raw, read
        self._size = raw.len() if raw is not None else size

    @classmethod
    def stored(cls, size: int, read: Callable[[], pl.Series]) -> IdMap:
        return cls(None, size, read)

    @property
    def raw(self) -> pl.Series:
        if self._raw is None:
            self._raw = self._read()
            if self._raw.len() != self._size:
                raise DataError(f"ID map: {self._raw.len()} IDs read, {self._size} expected")
        return self._raw

    def __len__(self) -> int:
        return self._size

    def to_raw(self, indices: np.ndarray) -> list:
        return self.raw.gather(np.asarray(indices, dtype=np.int64)).to_list()

    def to_index(self, raw_ids: list) -> np.ndarray:
        """Indices of `raw_ids`; unknown IDs give -1."""
        lookup = pl.DataFrame({"raw": self.raw, "index": np.arange(len(self), dtype=np.int64)})
        query = pl.DataFrame({"raw": pl.Series(raw_ids, dtype=self.raw.dtype)}).with_row_index("order")
        joined = query.join(lookup, on="raw", how="left").sort("order")
        return joined["index"].fill_null(-1).to_numpy()


@dataclass(frozen=True)
class EventLog:
    """A checked, ID-mapped, sorted event log and the vocabularies behind its indices."""

    events: pl.DataFrame
    actor_ids: IdMap
    target_ids: IdMap
    action_values: list[str]
    """Raw action value of each action index; `["<none>"]` when the log has no action."""
    shared_id_space: bool
    has_timestamps: bool
    """False when the log has no time: `timestamp` then holds the row number."""
    has_actions: bool
    """False when the log has no action field: every action is 0 (`<none>`)."""
    source: str
    report: dict = field(default_factory=dict)
    """What preparation did to the input: rows read, dropped (by reason), duplicates."""

    @property
    def num_events(self) -> int:
        return self.events.height


# ---------------------------------------------------------------------------- typing


def _parse_id(column: str, dtype: pl.DataType, id_type: str) -> tuple[pl.Expr, pl.Expr, str]:
    """(value, ok, what was expected) for an ID column."""
    c = pl.col(column)
    if id_type == "str":
        value = c.cast(pl.String).str.strip_chars()
        return value, value.is_not_null() & (value.str.len_bytes() > 0), "a non-empty ID"
    if dtype in _INT_TYPES:
        return c.cast(pl.Int64, strict=False), c.is_not_null() & c.cast(pl.Int64, strict=False).is_not_null(), "an integer ID"
    if dtype in _FLOAT_TYPES:
        ok = c.is_not_null() & c.is_finite() & (c == c.floor()) & (c.abs() < 2.0**63)
        return pl.when(ok).then(c).cast(pl.Int64, strict=False), ok, "an integer ID"
    value = c.cast(pl.String).str.strip_chars().cast(pl.Int64, strict=False)
    return value, value.is_not_null(), "an integer ID (use data.id_type=str for string IDs)"


# The largest time a log may hold: (actor, time) sort keys pack into one int64 when they fit.
_MAX_SECONDS = 2**62


def _parse_timestamp(dtype: pl.DataType) -> tuple[pl.Expr, pl.Expr, str]:
    c = pl.col("timestamp")
    expected = "a number of seconds in [0, 2^62)"
    if dtype == pl.Datetime or isinstance(dtype, pl.Datetime):
        value = c.dt.epoch("s")
        return value, value.is_not_null() & (value >= 0), "a datetime at or after 1970-01-01"
    if dtype == pl.Date:
        value = c.cast(pl.Datetime("ms")).dt.epoch("s")
        return value, value.is_not_null() & (value >= 0), "a date at or after 1970-01-01"
    if dtype in _INT_TYPES:
        value = c.cast(pl.Int64, strict=False)
        return value, value.is_not_null() & (value >= 0) & (value < _MAX_SECONDS), expected
    if dtype in _FLOAT_TYPES:
        number = c.cast(pl.Float64)
        exact = pl.lit(None, pl.Int64)
    else:
        # Integers first, so large second counts are parsed exactly; then decimals.
        text = c.cast(pl.String).str.strip_chars()
        exact = text.cast(pl.Int64, strict=False)
        number = text.cast(pl.Float64, strict=False)
    # An integer is checked as one: 2^62 - 1 is in range, though as a float it rounds to 2^62.
    ok = pl.when(exact.is_not_null()).then((exact >= 0) & (exact < _MAX_SECONDS)).otherwise(
        number.is_not_null() & number.is_finite() & (number >= 0) & (number < float(_MAX_SECONDS))
    )
    value = pl.when(exact.is_not_null()).then(exact).otherwise(number.floor().cast(pl.Int64, strict=False))
    return value, ok, expected


def _parse_action(dtype: pl.DataType) -> tuple[pl.Expr, pl.Expr, str]:
    expected = "an action type (integer, rating or name)"
    if dtype in _INT_TYPES:
        value = pl.col("action").cast(pl.Int64)
        return value, value.is_not_null(), expected
    if dtype in _FLOAT_TYPES:
        value = pl.col("action").cast(pl.Float64)
        return value, value.is_not_null() & value.is_finite(), expected
    value = pl.col("action").cast(pl.String).str.strip_chars()
    # `nan` (or `inf`) is a missing rating written out by pandas and the like, not an action
    # type: as text it would become an action named `nan`, and map_ids reads it as a number.
    number = value.cast(pl.Float64, strict=False)
    ok = value.is_not_null() & (value.str.len_bytes() > 0) & (number.is_null() | number.is_finite())
    return value, ok, expected


def _describe(raw: RawLog, line: int) -> str:
    exact = raw.exact_line(line) if raw.exact_line else line
    return f"{raw.source}:{exact}" if raw.location == "line" else f"{raw.source}: row {exact}"


def type_events(raw: RawLog, config: DataConfig) -> tuple[pl.DataFrame, dict]:
    """Check and type every field. Returns the typed frame (raw IDs, action strings) and a
    report of dropped rows. Raises `DataError` naming file, line and field on bad input
    unless `config.on_bad_rows == "drop"`."""
    typed, report = type_events_lazily(raw, config)
    return typed.collect(engine="streaming"), report


def type_events_lazily(raw: RawLog, config: DataConfig) -> tuple[pl.LazyFrame, dict]:
    """`type_events` without holding the log: the checks run as streaming queries over
    the source (counts, and the first bad row), and the typed events come back as a lazy
    frame over it, for a caller that streams them on (data/dataset.py)."""
    schema = raw.frame.collect_schema()
    parsed: dict[str, tuple[pl.Expr, pl.Expr, str]] = {
        "actor": _parse_id("actor", schema["actor"], config.id_type),
        "target": _parse_id("target", schema["target"], config.id_type),
    }
    if "timestamp" in raw.fields:
        parsed["timestamp"] = _parse_timestamp(schema["timestamp"])
    if "action" in raw.fields:
        parsed["action"] = _parse_action(schema["action"])

    checked = raw.frame.with_columns(
        *[ok.alias(f"_ok_{name}") for name, (_, ok, _) in parsed.items()],
        *[value.alias(f"_value_{name}") for name, (value, _, _) in parsed.items()],
    )
    ok_columns = [f"_ok_{name}" for name in parsed]
    is_bad = pl.col("_wrong_field_count") | ~pl.all_horizontal(ok_columns)
    reasons = {"wrong number of fields": pl.col("_wrong_field_count").sum()}
    for name in parsed:
        reasons[f"bad {name}"] = (~pl.col(f"_ok_{name}") & ~pl.col("_wrong_field_count") & is_bad).sum()
    counts = checked.select(
        rows=pl.len(), bad=is_bad.sum(), **{f"_{i}": expr for i, expr in enumerate(reasons.values())}
    ).collect(engine="streaming").row(0)
    rows_read, bad_rows = int(counts[0]), int(counts[1])
    if rows_read == 0:
        # Readers name what they can (a header without rows, comment-only files); this
        # catches the rest (a parquet data set of no rows) before sequences index into nothing.
        raise DataError(f"{raw.source}: no events; expected at least one {raw.location}")
    report: dict = {"rows_read": rows_read, "rows_dropped": 0, "dropped_by_reason": {}}

    if bad_rows:
        if config.on_bad_rows == "error":
            # The first bad row in file order (a streaming filter may not keep the order).
            first = checked.filter(is_bad).sort("line").head(1).collect(engine="streaming").row(0, named=True)
            line = int(first["line"])
            for name, (_, _, expected) in parsed.items():
                if not first[f"_ok_{name}"]:
                    got = first[name]
                    raise DataError(
                        f"{_describe(raw, line)}: {raw.labels[name]} ({name}): expected {expected}, got {got!r}"
                        f" ({bad_rows} bad row(s) in all; data.on_bad_rows=drop skips them and reports the count)"
                    )
            raise DataError(f"{_describe(raw, line)}: wrong number of fields")
        dropped = {reason: int(count) for reason, count in zip(reasons, counts[2:])}
        report["rows_dropped"] = bad_rows
        report["dropped_by_reason"] = {k: v for k, v in dropped.items() if v}
        log.warning("%s: dropped %d bad row(s): %s", raw.source, bad_rows, report["dropped_by_reason"])
        if bad_rows == rows_read:
            raise DataError(f"{raw.source}: every row was bad; nothing left to train on")
        checked = checked.filter(~is_bad)

    typed = checked.select(
        pl.col("_value_actor").alias("actor"),
        pl.col("_value_target").alias("target"),
        (pl.col("_value_action") if "action" in parsed else pl.lit(None, pl.String)).alias("action"),
        (pl.col("_value_timestamp") if "timestamp" in parsed else pl.col("line")).alias("timestamp"),
        pl.col("line").alias("row"),
    )
    return typed, report


# ------------------------------------------------------------------------- mapping


def _dense_index(values: pl.Series) -> tuple[pl.Series, pl.Series]:
    """(index of each value in the sorted vocabulary, the sorted vocabulary)."""
    vocabulary = values.unique().sort()
    if values.dtype == pl.Int64 and len(vocabulary):
        low, high = int(vocabulary[0]), int(vocabulary[-1])
        # Integer IDs of a reasonable range: a direct lookup table is O(N), where a
        # join or a rank would sort or hash all N values again.
        if 0 <= high - low <= max(4 * len(values), 1 << 20):
            lookup = np.full(high - low + 1, -1, dtype=np.int64)
            lookup[vocabulary.to_numpy() - low] = np.arange(len(vocabulary), dtype=np.int64)
            return pl.Series(lookup[values.to_numpy() - low]), vocabulary
    frame = pl.DataFrame({"raw": vocabulary, "index": np.arange(len(vocabulary), dtype=np.int64)})
    joined = pl.DataFrame({"raw": values}).join(frame, on="raw", how="left", maintain_order="left")
    return joined["index"], vocabulary


def map_ids(typed: pl.DataFrame, shared_id_space: bool) -> tuple[pl.DataFrame, IdMap, IdMap, list[str]]:
    """Raw IDs -> contiguous indices in sorted raw order; action values -> indices."""
    if shared_id_space:
        index, vocabulary = _dense_index(pl.concat([typed["actor"], typed["target"]]))
        actor_index, target_index = index.slice(0, typed.height), index.slice(typed.height)
        actor_ids = target_ids = IdMap(vocabulary)
    else:
        actor_index, actor_vocabulary = _dense_index(typed["actor"])
        target_index, target_vocabulary = _dense_index(typed["target"])
        actor_ids, target_ids = IdMap(actor_vocabulary), IdMap(target_vocabulary)

    action_index, action_values = map_actions(typed["action"])

    events = pl.DataFrame(
        {
            "actor": actor_index,
            "target": target_index,
            "action": action_index.cast(pl.Int32),
            "timestamp": typed["timestamp"].cast(pl.Int64),
            "row": typed["row"].cast(pl.Int64),
        }
    )
    return events, actor_ids, target_ids, action_values


def map_actions(action: pl.Series) -> tuple[pl.Series, list[str]]:
    """(index of each action value, the label of each index). No action column (all
    null): one action `<none>`. Ratings and numeric event types order numerically
    (1 < 2 < 10, and "1" and "1.0" are one type), names lexically."""
    if action.null_count() == len(action):
        return pl.Series(np.zeros(len(action), dtype=np.int32)), ["<none>"]
    if action.dtype == pl.String:
        numeric = action.cast(pl.Float64, strict=False)
        if numeric.null_count() == 0:
            action = numeric
    action_index, vocabulary = _dense_index(action)
    return action_index, [_action_label(v) for v in vocabulary.to_list()]


def _action_label(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def sort_events(events: pl.DataFrame) -> pl.DataFrame:
    """Sort by (actor, timestamp, row), stable. Rows arrive in file order, so a stable sort
    on (actor, timestamp) breaks time ties by file order."""
    if events.height == 0:
        return events
    span = int(events["timestamp"].max()) - int(events["timestamp"].min())
    actor_bits = max(int(events["actor"].max()), 1).bit_length()
    if span.bit_length() + actor_bits <= 62:
        # One int64 key sorts much faster than a multi-column sort.
        key = pl.col("actor") * (1 << span.bit_length()) + (pl.col("timestamp") - pl.col("timestamp").min())
        return events.with_columns(_key=key).sort("_key", maintain_order=True).drop("_key")
    return events.sort(["actor", "timestamp", "row"], maintain_order=True)


def load_events(config: DataConfig, path: str | Path | None = None) -> EventLog:
    """Read, check, ID-map and sort a log: the full preparation up to the event table."""
    raw = read_log(path if path is not None else config.path, config)
    typed, report = type_events(raw, config)
    shared = config.shared_id_space
    if shared is None:
        shared = raw.actors_are_targets
    events, actor_ids, target_ids, action_values = map_ids(typed, shared)
    if config.drop_duplicate_events:
        # After the mapping: "1" and "1.0" are one action type, so such events are equal.
        before = events.height
        events = events.unique(subset=["actor", "target", "action", "timestamp"], keep="first", maintain_order=True)
        report["duplicates_dropped"] = before - events.height
        log.info("%s: dropped %d duplicate event(s)", raw.source, report["duplicates_dropped"])
    # A stable order: (actor, time, original row). The row breaks time ties by file order.
    events = sort_events(events)
    return EventLog(
        events=events,
        actor_ids=actor_ids,
        target_ids=target_ids,
        action_values=action_values,
        shared_id_space=shared,
        has_timestamps="timestamp" in raw.fields,
        has_actions="action" in raw.fields,
        source=raw.source,
        report=report,
    )
