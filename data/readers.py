"""Format readers: a log file on disk -> a `RawLog` of untyped columns with line numbers.

Each reader only splits the file into fields and remembers where every row came
from (its physical line, or its row in a parquet data set); turning fields into
typed, checked events is `data/events.py`'s job, so every format gets the same
checks and the same error messages.

Formats:
- `snap`: whitespace-separated `SRC DST [TS]` (SNAP temporal graphs such as
  CollegeMsg). Lines starting with `#` or `%` are comments, blank lines are skipped.
- `inter`: RecBole atomic files: tab-separated, header of `name:type` fields.
- `csv`: comma-separated with a header row of column names, or (`data.header=false`)
  columns by position: `actor,target[,action][,timestamp]`.
- `parquet`: one file, or a directory scanned recursively for `*.parquet`
  (lazily, so a log larger than memory streams through preparation). Files may
  differ in integer widths (widened losslessly), not otherwise in column types.

NOTE: text files are read with polars' `utf8-lossy` decoding; a line holding bytes
that are not UTF-8 is reported as such rather than crashing the reader. A text log
may be gzip-compressed (`log.csv.gz`: the format comes from the name without `.gz`)
and may start with a UTF-8 byte order mark; neither changes the line numbers.
"""

from __future__ import annotations

import csv
import gzip
import logging
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import polars as pl

from configs.schema import DataConfig

# Canonical field names, in the order a user thinks of them.
FIELDS = ("actor", "target", "action", "timestamp")
REQUIRED_FIELDS = ("actor", "target")
# U+FFFD, what utf8-lossy decoding puts where bytes were not UTF-8.
_REPLACEMENT_CHAR = "\ufffd"
# A separator that never occurs in text logs, to read whole lines as one column.
_WHOLE_LINE = "\x1f"
_GZIP_MAGIC = b"\x1f\x8b"
# Columns under another name that probably hold an optional field: named in the warning
# that the field is absent, since training without them is silently worse, not an error.
_LOOKALIKES = {
    "timestamp": (
        "time", "ts", "date", "datetime", "unix_time", "unixtime", "epoch", "created_at", "time_stamp", "seconds"
    ),
    "action": ("rating", "event", "type", "event_type", "action_type", "kind", "label", "interaction"),
}
_WITHOUT = {"timestamp": "events are ordered by row", "action": "every event has the same action type"}
# Default column of each field in csv and parquet logs.
_NAMED_COLUMNS = {name: name for name in FIELDS}
# A headerless CSV's columns by field count (data.header=false); 3 columns read like SNAP.
_POSITIONAL = {
    2: ("actor", "target"),
    3: ("actor", "target", "timestamp"),
    4: ("actor", "target", "action", "timestamp"),
}

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input. The message names the file, the line (or row) and the field, and says
    what was expected, so the user can fix the log without reading a stack trace."""


@dataclass(frozen=True)
class RawLog:
    """Fields of a log before typing.

    `frame` has a `line` column (Int64: 1-based physical line for text files, 1-based
    row for parquet) and one column per field in `fields`; text readers give strings,
    parquet gives the stored types. `labels` say how to name a field to the user
    (e.g. `field 2 (DST)` or `column 'receiver'`). `exact_line`, when set, turns a
    reported `line` into the exact physical line (only CSV needs it: quoted fields may
    hold newlines); it is called on the error path only.
    """

    source: str
    frame: pl.LazyFrame
    fields: tuple[str, ...]
    labels: dict[str, str]
    location: str = "line"
    actors_are_targets: bool = False
    """The format says actors and targets are one kind of entity (graph edge lists)."""
    exact_line: Callable[[int], int] | None = None


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "parquet"
    # A compressed log is named for its content plus `.gz` (`log.csv.gz`).
    suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    return {".parquet": "parquet", ".inter": "inter", ".csv": "csv"}.get(suffix, "snap")


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def _open_text(path: Path) -> TextIO:
    """The file as text for the csv module, as polars reads it: gzip decompressed (polars
    detects gzip by content too), a UTF-8 byte order mark dropped, bytes that are not UTF-8
    replaced (`_check_utf8` reports them), newlines left to the csv module."""
    if _is_gzip(path):
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace", newline="")
    return open(path, encoding="utf-8-sig", errors="replace", newline="")


SYNTHETIC_PREFIX = "synthetic:"


def read_log(path: str | Path, config: DataConfig) -> RawLog:
    """Open `path` with the reader for `config.format` (or the one its extension implies);
    `synthetic:SPEC` generates a log in memory instead (data/synthetic.py)."""
    if str(path).startswith(SYNTHETIC_PREFIX):
        return read_synthetic(str(path)[len(SYNTHETIC_PREFIX):])
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory (data.path)")
    fmt = detect_format(path) if config.format == "auto" else config.format
    if not config.header and fmt != "csv":
        raise DataError(f"{path}: data.header=false applies to csv logs only; this log is read as {fmt}")
    if fmt == "parquet":
        return read_parquet(path, config)
    if path.is_dir():
        raise DataError(f"{path}: is a directory; only the parquet format reads directories")
    reader = {"snap": read_snap, "inter": read_inter, "csv": read_csv}[fmt]
    try:
        with _open_text(path) as f:
            if f.read(1) == "":  # after decompression and a byte order mark
                raise DataError(f"{path}: the file is empty; expected at least one event")
        return reader(path, config)
    except (EOFError, zlib.error, OSError) as e:
        # A damaged gzip stream is found wherever it is first read: polars reports it as an
        # OSError, the gzip module as EOFError (truncated) or OSError (BadGzipFile).
        if not _is_gzip(path):
            raise
        raise DataError(f"{path}: not a readable gzip file ({e})") from None


def _read_lines(path: Path) -> pl.LazyFrame:
    """Every physical line as one string column, numbered from 1 (blank lines included,
    so numbering matches what an editor shows)."""
    lines = pl.scan_csv(
        path,
        has_header=False,
        separator=_WHOLE_LINE,
        quote_char=None,
        schema={"text": pl.String},
        encoding="utf8-lossy",
    )
    return lines.with_row_index("line", offset=1).with_columns(
        pl.col("line").cast(pl.Int64), pl.col("text").fill_null("").str.strip_chars_end("\r")
    )


def _check_utf8(path: Path, lines: pl.LazyFrame) -> None:
    bad = lines.filter(pl.col("text").str.contains(_REPLACEMENT_CHAR, literal=True)).select("line").head(1).collect()
    if bad.height:
        raise DataError(f"{path}:{bad['line'][0]}: the line is not valid UTF-8 text")


def _field_count_error(path: Path, line: int, found: int, expected: str, last_line: int) -> DataError:
    hint = " (the last line looks truncated)" if line == last_line else ""
    return DataError(f"{path}:{line}: expected {expected}, found {found} field(s){hint}")


def read_snap(path: Path, config: DataConfig) -> RawLog:
    """`SRC DST [TS]`, whitespace separated, no header."""
    lines = _read_lines(path)
    _check_utf8(path, lines)
    data = (
        lines.filter(~pl.col("text").str.strip_chars_start().str.contains(r"^(?:[#%]|$)"))
        .with_columns(tokens=pl.col("text").str.extract_all(r"\S+"))
        .with_columns(num_fields=pl.col("tokens").list.len())
        .collect()
    )
    if data.height == 0:
        raise DataError(f"{path}: no events (only blank or comment lines); expected lines of `SRC DST [TS]`")
    # The log's layout (2 or 3 fields) is that of its first line with 2 or 3 fields, so a
    # corrupted first line is one bad row (dropped in drop mode), not a wrong layout.
    layout = data.filter(pl.col("num_fields").is_in([2, 3]))
    if layout.height == 0:
        found = f"expected 2 or 3 fields (SRC DST [TS]), found {data['num_fields'][0]}"
        if config.on_bad_rows == "drop":
            raise DataError(f"{path}: every row was bad (the first, line {data['line'][0]}: {found}); nothing left to train on")
        raise DataError(f"{path}:{data['line'][0]}: {found}")
    num_fields = int(layout["num_fields"][0])
    expected = "3 fields (SRC DST TS)" if num_fields == 3 else "2 fields (SRC DST)"
    bad = data.filter(pl.col("num_fields") != num_fields)
    if bad.height and config.on_bad_rows == "error":
        last_line = int(data["line"][-1])
        raise _field_count_error(path, int(bad["line"][0]), int(bad["num_fields"][0]), expected, last_line)
    names = ["actor", "target", "timestamp"][:num_fields]
    if num_fields == 2:
        _warn_absent(path, "timestamp", "field (the lines have 2 fields, SRC DST)")
    frame = data.select(
        "line",
        *[pl.col("tokens").list.get(i, null_on_oob=True).alias(name) for i, name in enumerate(names)],
        _wrong_field_count=pl.col("num_fields") != num_fields,
    )
    labels = {"actor": "field 1 (SRC)", "target": "field 2 (DST)", "timestamp": "field 3 (TS)"}
    return RawLog(str(path), frame.lazy(), tuple(names), labels, actors_are_targets=True)


def _warn_absent(path: Path, name: str, looked_for: str, columns: Iterable[str] = ()) -> None:
    """One warning line for an absent optional field: the log still trains, but without
    time (or action types) it silently trains worse, so say so, and name a column that
    probably holds the field under another name (or the default name in another case)."""
    message = f"{path}: no {name} {looked_for}; {_WITHOUT[name]}"
    lookalike = next((c for c in columns if c.lower() in (name, *_LOOKALIKES[name])), None)
    if lookalike is not None:
        message += f". Column '{lookalike}' looks like one: data.{name}_column={lookalike} uses it"
    log.warning("%s", message)


def _resolve_columns(
    path: Path, header: list[str], config: DataConfig, defaults: dict[str, str], missing_hint: str = ""
) -> dict[str, str]:
    """Map canonical fields to column names of the file; a column the user named must exist.
    An absent optional column is warned about (`_warn_absent`)."""
    explicit = {
        "actor": config.actor_column,
        "target": config.target_column,
        "action": config.action_column,
        "timestamp": config.timestamp_column,
    }
    chosen = {}
    for name in FIELDS:
        column = explicit[name] or defaults[name]
        if column in header:
            chosen[name] = column
        elif explicit[name] is not None or name in REQUIRED_FIELDS:
            raise DataError(
                f"{path}: missing column '{column}' for the {name} (data.{name}_column); "
                f"the file has columns: {', '.join(header)}{missing_hint}"
            )
    unused = [c for c in header if c not in chosen.values()]
    for name in FIELDS:
        if name not in chosen:
            _warn_absent(path, name, f"column ('{defaults[name]}')", unused)
    return chosen


def read_inter(path: Path, config: DataConfig) -> RawLog:
    """RecBole `.inter`: tab-separated, header `user_id:token item_id:token rating:float ...`."""
    lines = _read_lines(path)
    _check_utf8(path, lines)
    data = lines.with_columns(tokens=pl.col("text").str.split("\t")).collect()
    # Spaces around a header token are not part of the name (`user_id:token \t item_id:token`).
    header_tokens = [token.strip() for token in data["tokens"][0].to_list()]
    header = [token.split(":", 1)[0].strip() for token in header_tokens]
    if any(":" not in token for token in header_tokens):
        raise DataError(f"{path}:1: expected a RecBole header of `name:type` fields separated by tabs, got {data['text'][0]!r}")
    body = data.slice(1).filter(pl.col("text").str.strip_chars() != "")
    if body.height == 0:
        raise DataError(f"{path}: no events after the header line")
    body = body.with_columns(num_fields=pl.col("tokens").list.len())
    bad = body.filter(pl.col("num_fields") != len(header))
    if bad.height and config.on_bad_rows == "error":
        expected = f"{len(header)} tab-separated fields ({', '.join(header)})"
        raise _field_count_error(path, int(bad["line"][0]), int(bad["num_fields"][0]), expected, int(body["line"][-1]))
    defaults = {"actor": "user_id", "target": "item_id", "action": "rating", "timestamp": "timestamp"}
    columns = _resolve_columns(path, header, config, defaults)
    frame = body.select(
        "line",
        *[pl.col("tokens").list.get(header.index(col), null_on_oob=True).alias(name) for name, col in columns.items()],
        _wrong_field_count=pl.col("num_fields") != len(header),
    )
    labels = {name: f"column '{col}'" for name, col in columns.items()}
    return RawLog(str(path), frame.lazy(), tuple(columns), labels)


def _csv_rows(path: Path, header: bool) -> Iterator[tuple[int, list[str]]]:
    """(physical line where the row starts, its fields) of every data row, counted with the
    csv module: quoted fields may hold newlines, so rows and lines can differ. Blank lines
    are rows of no fields (polars reads them as rows of empty fields: typing names them)."""
    with _open_text(path) as f:
        reader = csv.reader(f)
        if header:
            next(reader, None)
        line = reader.line_num + 1
        for fields in reader:
            yield line, fields
            line = reader.line_num + 1


def _csv_line_of_row(path: Path, row: int, header: bool) -> int:
    """Physical line where data row `row` (0-based, after any header) starts. Used only on
    the error path."""
    line = 1
    for index, (line, _) in enumerate(_csv_rows(path, header)):
        if index == row:
            break
    return line


def _csv_ragged_rows(path: Path, num_columns: int, header: bool) -> tuple[list[tuple[int, int, int]], int]:
    """(data row index, line, number of fields) of every row whose field count is not
    `num_columns`, and the number of rows that are not blank. Blank rows are not listed:
    they fail typing and are named there."""
    ragged, num_rows = [], 0
    for row, (line, fields) in enumerate(_csv_rows(path, header)):
        if fields:
            num_rows += 1
            if len(fields) != num_columns:
                ragged.append((row, line, len(fields)))
    return ragged, num_rows


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _csv_positional_columns(path: Path) -> list[str]:
    """The fields of a headerless CSV log (`data.header=false`), by position. The first row
    with 2 to 4 fields picks the layout (`_POSITIONAL`), so a corrupted first row is one
    bad row (dropped in drop mode), not a wrong layout."""
    first = None
    for line, fields in _csv_rows(path, header=False):
        if len(fields) in _POSITIONAL:
            names = list(_POSITIONAL[len(fields)])
            for name in ("timestamp", "action"):
                if name not in names:
                    _warn_absent(path, name, f"column ({len(names)} columns without a header: {','.join(names)})")
            return names
        if fields and first is None:
            first = (line, len(fields))
    if first is None:
        raise DataError(f"{path}: no events (only blank lines)")
    raise DataError(
        f"{path}:{first[0]}: expected 2 to 4 comma-separated fields (data.header=false reads actor,target / "
        f"actor,target,timestamp / actor,target,action,timestamp), found {first[1]}"
    )


def _csv_header(path: Path, config: DataConfig) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(the file's column names, field -> column, field -> label) of a CSV log."""
    if not config.header:
        names = _csv_positional_columns(path)
        return names, {name: name for name in names}, {name: f"column {i + 1}" for i, name in enumerate(names)}
    with _open_text(path) as f:
        # A name is the cell without surrounding spaces (`actor, target`); `_open_text` drops a BOM.
        header = [cell.strip() for cell in next(csv.reader(f), [])]
    if not header:
        raise DataError(f"{path}:1: expected a header row of column names")
    hint = ""
    if all(_is_number(cell) for cell in header):
        hint = "; the first row looks like data, not column names: data.header=false reads the columns by position"
    columns = _resolve_columns(path, header, config, _NAMED_COLUMNS, missing_hint=hint)
    return header, columns, {name: f"column '{col}'" for name, col in columns.items()}


def read_csv(path: Path, config: DataConfig) -> RawLog:
    """CSV with a header row of column names, or without one (`data.header=false`) with
    columns by position; every field is read as text and typed later."""
    header, columns, labels = _csv_header(path, config)
    _check_utf8(path, _read_lines(path))
    ragged, num_rows = _csv_ragged_rows(path, len(header), config.header)
    if num_rows == 0:
        raise DataError(f"{path}: no events after the header line")
    if ragged and config.on_bad_rows == "error":
        _, line, found = ragged[0]
        names = ", ".join(header) if config.header else f"{', '.join(header)}; data.header=false"
        raise _field_count_error(path, line, found, f"{len(header)} comma-separated fields ({names})", -1)
    # Columns are named by position, not by the header's cells: a cell may differ from its
    # name by spaces (or repeat another), and a headerless file has no names at all.
    frame = pl.scan_csv(
        path,
        has_header=config.header,
        schema={f"_{i}": pl.String for i in range(len(header))},
        encoding="utf8-lossy",
        truncate_ragged_lines=True,
        missing_utf8_is_empty_string=True,
    ).with_row_index("row")
    frame = frame.select(
        pl.col("row").cast(pl.Int64),
        *[pl.col(f"_{header.index(col)}").alias(name) for name, col in columns.items()],
    ).with_columns(
        # polars pads short rows and truncates long ones; drop mode must still drop them.
        _wrong_field_count=pl.col("row").is_in(pl.Series([r for r, _, _ in ragged], dtype=pl.Int64))
    )
    # Rows map to lines one-to-one unless quoted fields hold newlines; the exact line of
    # a bad row is recomputed on the error path (see `exact_line`).
    first_line = 2 if config.header else 1
    frame = frame.with_columns(line=pl.col("row") + first_line).drop("row")
    return RawLog(
        str(path),
        frame,
        tuple(columns),
        labels,
        exact_line=lambda line: _csv_line_of_row(path, line - first_line, config.header),
    )


# Integer types from narrow to wide, with the values each holds ([low, high)): the first
# that holds the values of two types is their lossless common type.
_INTEGER_RANGES = {
    pl.UInt8: (0, 2**8), pl.Int8: (-(2**7), 2**7),
    pl.UInt16: (0, 2**16), pl.Int16: (-(2**15), 2**15),
    pl.UInt32: (0, 2**32), pl.Int32: (-(2**31), 2**31),
    pl.UInt64: (0, 2**64), pl.Int64: (-(2**63), 2**63),
}  # fmt: skip


def _widen(a: pl.DataType, b: pl.DataType) -> pl.DataType | None:
    """The type that holds every value of `a` and of `b` without loss, or None."""
    if a == b:
        return a
    if a in _INTEGER_RANGES and b in _INTEGER_RANGES:
        low = min(_INTEGER_RANGES[a][0], _INTEGER_RANGES[b][0])
        high = max(_INTEGER_RANGES[a][1], _INTEGER_RANGES[b][1])
        return next((t for t, (lo, hi) in _INTEGER_RANGES.items() if lo <= low and high <= hi), None)
    if {a, b} == {pl.Float32, pl.Float64}:
        return pl.Float64
    return None


def _common_type(name: str, column: str, schemas: dict[Path, pl.Schema]) -> pl.DataType:
    """The type every file's `column` widens to without loss. A file without the column, or
    with a type that does not widen to the others', is an error naming it."""
    having = [(file, schema[column]) for file, schema in schemas.items() if column in schema]
    for file, schema in schemas.items():
        if column not in schema:
            raise DataError(
                f"{file}: missing column '{column}' for the {name}, which {having[0][0]} has; "
                f"every file of the data set needs it"
            )
    common = having[0][1]
    for file, dtype in having[1:]:
        widened = _widen(common, dtype)
        if widened is None:
            other, other_type = next((f, t) for f, t in having if _widen(t, dtype) is None)
            raise DataError(
                f"{file}: column '{column}' is {dtype}, but {other} has {other_type}; the files of a parquet "
                f"data set must agree on column types (only integer and float widths are widened)"
            )
        common = widened
    return common


def read_parquet(path: Path, config: DataConfig) -> RawLog:
    """One parquet file or a directory of them (recursively, in sorted path order)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise DataError(f"{path}: directory holds no *.parquet files")
    else:
        files = [path]
    # Every file's schema (footers only), so a file that disagrees is named, not a polars
    # SchemaError raised mid-scan.
    schemas = {}
    for file in files:
        try:
            schemas[file] = pl.read_parquet_schema(file)
        except (pl.exceptions.PolarsError, OSError) as e:
            raise DataError(f"{file}: not a readable parquet file: {str(e).splitlines()[0]}") from None
    header = list(dict.fromkeys(column for schema in schemas.values() for column in schema))
    columns = _resolve_columns(path, header, config, _NAMED_COLUMNS)
    types = {column: _common_type(name, column, schemas) for name, column in columns.items()}
    frame = pl.scan_parquet(
        files,
        schema=types,
        extra_columns="ignore",
        cast_options=pl.ScanCastOptions(integer_cast="upcast", float_cast="upcast"),
    )
    frame = frame.select(*[pl.col(col).alias(name) for name, col in columns.items()])
    frame = frame.with_row_index("line", offset=1).with_columns(
        pl.col("line").cast(pl.Int64), _wrong_field_count=pl.lit(False)
    )
    labels = {name: f"column '{col}'" for name, col in columns.items()}
    return RawLog(str(path), frame, tuple(columns), labels, location="row")


def read_synthetic(spec_text: str) -> RawLog:
    """A synthetic log generated from its spec, typed like a parquet file's columns."""
    from data.synthetic import generate, parse_spec  # numpy-heavy; only when asked for

    try:
        spec = parse_spec(spec_text)
    except ValueError as e:
        raise DataError(f"data.path: {SYNTHETIC_PREFIX}{spec_text}: {e}") from None
    fields = ("actor", "target", "action", "timestamp")
    frame = generate(spec).lazy().with_row_index("line", offset=1)
    frame = frame.with_columns(pl.col("line").cast(pl.Int64), _wrong_field_count=pl.lit(False))
    labels = {name: f"column '{name}'" for name in fields}
    return RawLog(
        f"{SYNTHETIC_PREFIX}{spec_text}", frame, fields, labels, location="row", actors_are_targets=spec.shared_id_space
    )
