"""Format readers: a log file on disk -> a `RawLog` of untyped columns with line numbers.

Each reader only splits the file into fields and remembers where every row came
from (its physical line, or its row in a parquet data set); turning fields into
typed, checked events is `data/events.py`'s job, so every format gets the same
checks and the same error messages.

Formats:
- `snap`: whitespace-separated `SRC DST [TS]` (SNAP temporal graphs such as
  CollegeMsg). Lines starting with `#` or `%` are comments, blank lines are skipped.
- `inter`: RecBole atomic files: tab-separated, header of `name:type` fields.
- `csv`: comma-separated with a header row of column names.
- `parquet`: one file, or a directory scanned recursively for `*.parquet`
  (lazily, so a log larger than memory streams through preparation).

NOTE: text files are read with polars' `utf8-lossy` decoding; a line holding bytes
that are not UTF-8 is reported as such rather than crashing the reader.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from configs.schema import DataConfig

# Canonical field names, in the order a user thinks of them.
FIELDS = ("actor", "target", "action", "timestamp")
REQUIRED_FIELDS = ("actor", "target")
# U+FFFD, what utf8-lossy decoding puts where bytes were not UTF-8.
_REPLACEMENT_CHAR = "\ufffd"
# A separator that never occurs in text logs, to read whole lines as one column.
_WHOLE_LINE = "\x1f"


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
    if path.is_dir() or path.suffix == ".parquet":
        return "parquet"
    if path.suffix == ".inter":
        return "inter"
    if path.suffix == ".csv":
        return "csv"
    return "snap"


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
    if fmt != "parquet" and path.is_dir():
        raise DataError(f"{path}: is a directory; only the parquet format reads directories")
    if fmt != "parquet" and path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty; expected at least one event")
    reader = {"snap": read_snap, "inter": read_inter, "csv": read_csv, "parquet": read_parquet}[fmt]
    return reader(path, config)


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
    frame = data.select(
        "line",
        *[pl.col("tokens").list.get(i, null_on_oob=True).alias(name) for i, name in enumerate(names)],
        _wrong_field_count=pl.col("num_fields") != num_fields,
    )
    labels = {"actor": "field 1 (SRC)", "target": "field 2 (DST)", "timestamp": "field 3 (TS)"}
    return RawLog(str(path), frame.lazy(), tuple(names), labels, actors_are_targets=True)


def _resolve_columns(path: Path, header: list[str], config: DataConfig, defaults: dict[str, str]) -> dict[str, str]:
    """Map canonical fields to column names of the file; a column the user named must exist."""
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
                f"the file has columns: {', '.join(header)}"
            )
    return chosen


def read_inter(path: Path, config: DataConfig) -> RawLog:
    """RecBole `.inter`: tab-separated, header `user_id:token item_id:token rating:float ...`."""
    lines = _read_lines(path)
    _check_utf8(path, lines)
    data = lines.with_columns(tokens=pl.col("text").str.split("\t")).collect()
    header_tokens = data["tokens"][0].to_list()
    header = [token.split(":", 1)[0] for token in header_tokens]
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


def _csv_line_of_row(path: Path, row: int) -> int:
    """Physical line where data row `row` (0-based, after the header) starts. Used only on
    the error path: quoted fields may span lines, so count with the csv module."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        next(reader, None)
        line = reader.line_num + 1
        for index, _ in enumerate(reader):
            if index == row:
                return line
            line = reader.line_num + 1
    return line


def _csv_ragged_rows(path: Path, num_columns: int) -> list[tuple[int, int, int]]:
    """(data row index, line, number of fields) of every row whose field count is not the
    header's. Blank lines are rows too (polars reads them as empty fields, which fail
    typing and are named there), so they are counted but not listed."""
    ragged = []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        next(reader, None)
        line = reader.line_num + 1
        for row, fields in enumerate(reader):
            if fields and len(fields) != num_columns:
                ragged.append((row, line, len(fields)))
            line = reader.line_num + 1
    return ragged


def read_csv(path: Path, config: DataConfig) -> RawLog:
    """CSV with a header row; every field is read as text and typed later."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(io.StringIO(f.readline())), [])
    if not header:
        raise DataError(f"{path}:1: expected a header row of column names")
    defaults = {"actor": "actor", "target": "target", "action": "action", "timestamp": "timestamp"}
    columns = _resolve_columns(path, header, config, defaults)
    _check_utf8(path, _read_lines(path))
    ragged = _csv_ragged_rows(path, len(header))
    if ragged and config.on_bad_rows == "error":
        _, line, found = ragged[0]
        raise _field_count_error(path, line, found, f"{len(header)} comma-separated fields ({', '.join(header)})", -1)
    frame = pl.scan_csv(
        path,
        infer_schema=False,
        encoding="utf8-lossy",
        truncate_ragged_lines=True,
        missing_utf8_is_empty_string=True,
    ).with_row_index("row")
    frame = frame.select(
        pl.col("row").cast(pl.Int64),
        *[pl.col(col).alias(name) for name, col in columns.items()],
    ).with_columns(
        # polars pads short rows and truncates long ones; drop mode must still drop them.
        _wrong_field_count=pl.col("row").is_in(pl.Series([r for r, _, _ in ragged], dtype=pl.Int64))
    )
    labels = {name: f"column '{col}'" for name, col in columns.items()}
    # Rows map to lines one-to-one unless quoted fields hold newlines; the exact line of
    # a bad row is recomputed on the error path (see `line_of`).
    frame = frame.with_columns(line=pl.col("row") + 2).drop("row")
    return RawLog(str(path), frame, tuple(columns), labels, exact_line=lambda line: _csv_line_of_row(path, line - 2))


def read_parquet(path: Path, config: DataConfig) -> RawLog:
    """One parquet file or a directory of them (recursively, in sorted path order)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise DataError(f"{path}: directory holds no *.parquet files")
    else:
        files = [path]
    try:
        frame = pl.scan_parquet(files)
        header = list(frame.collect_schema().names())
    except (pl.exceptions.PolarsError, OSError) as e:
        raise DataError(f"{path}: not a readable parquet data set: {e}") from None
    defaults = {"actor": "actor", "target": "target", "action": "action", "timestamp": "timestamp"}
    columns = _resolve_columns(path, header, config, defaults)
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
