"""Property tests of the readers against bad input: whatever mix of good and corrupted
rows a log holds, reading it either gives back exactly the good rows, or fails with a
`DataError` that names the file and one of the corrupted lines. Never another exception
from deep inside polars or torch, never a row silently lost."""

from __future__ import annotations

import gzip
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.events import load_events
from data.readers import DataError
from tests.conftest import data_config

good_ids = st.one_of(st.integers(0, 30), st.integers(-(2**63), 2**63 - 1))
good_rows = st.tuples(good_ids, good_ids, st.integers(0, 2**40))

# Each corruption turns a good row into a line that is wrong in one named way.
CORRUPTIONS = {
    "word_actor": lambda a, t, ts, sep: f"x{a}{sep}{t}{sep}{ts}",
    "huge_target": lambda a, t, ts, sep: f"{a}{sep}{2**64 + abs(t)}{sep}{ts}",
    "negative_timestamp": lambda a, t, ts, sep: f"{a}{sep}{t}{sep}-{ts + 1}",
    "word_timestamp": lambda a, t, ts, sep: f"{a}{sep}{t}{sep}noon",
    "extra_field": lambda a, t, ts, sep: f"{a}{sep}{t}{sep}{ts}{sep}7",
    "missing_field": lambda a, t, ts, sep: f"{a}{sep}{t}",
    "not_utf8": lambda a, t, ts, sep: f"{a}\udcff{sep}{t}{sep}{ts}",
}
# A SNAP log takes its field count (2 or 3) from its first line, so a short line is
# only wrong after a 3-field one; the hand-written reader tests cover it. A CSV without
# a header takes it (2 to 4) from its first line too.
NOT_CORRUPT = {
    "snap": {"missing_field"},
    "csv": set(),
    "inter": set(),
    "csv_gzip": set(),
    "csv_headerless": {"missing_field", "extra_field"},
}


def lines(fmt: str):
    corruptions = sorted(set(CORRUPTIONS) - NOT_CORRUPT[fmt])
    return st.lists(st.tuples(good_rows, st.one_of(st.none(), st.sampled_from(corruptions))), min_size=1, max_size=25)

# name, header line (None: no header), separator; a `.gz` name is written compressed
FORMATS = {
    "snap": ("log.txt", None, " "),
    "csv": ("log.csv", "actor,target,timestamp", ","),
    "inter": ("log.inter", "user_id:token\titem_id:token\ttimestamp:float", "\t"),
    "csv_gzip": ("log.csv.gz", "actor,target,timestamp", ","),
    "csv_headerless": ("log.csv", None, ","),
}
CONFIGS = {"csv_headerless": {"header": False}}


def _write(fmt: str, rows) -> tuple[Path, set[int], list[tuple]]:
    """The file, the line numbers holding a corruption, and the good rows in order."""
    name, header, sep = FORMATS[fmt]
    text_lines = [] if header is None else [header]
    corrupted, good = set(), []
    for (actor, target, ts), corruption in rows:
        if corruption is None:
            text_lines.append(f"{actor}{sep}{target}{sep}{ts}")
            good.append((actor, target, ts))
        else:
            text_lines.append(CORRUPTIONS[corruption](actor, target, ts, sep))
            corrupted.add(len(text_lines))  # 1-based line number of the line just added
    path = Path(tempfile.mkdtemp()) / name
    # surrogateescape writes the lone \udcff as the raw byte 0xff: not UTF-8.
    data = "\n".join(text_lines).encode("utf-8", "surrogateescape") + b"\n"
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return path, corrupted, good


def _named_line(message: str, path: Path) -> int:
    match = re.match(rf"{re.escape(str(path))}:(\d+): ", message)
    assert match, f"error does not start with file:line: {message}"
    return int(match.group(1))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_a_log_reads_exactly_its_rows_or_names_a_corrupted_line(fmt, data):
    rows = data.draw(lines(fmt))
    path, corrupted, good = _write(fmt, rows)
    try:
        log = load_events(data_config(path, **CONFIGS.get(fmt, {})))
    except DataError as error:
        assert corrupted, f"a clean log was refused: {error}"
        assert _named_line(str(error), path) in corrupted, str(error)
        return
    assert not corrupted, f"corrupted lines {sorted(corrupted)} were accepted"
    by_row = log.events.sort("row")
    assert log.actor_ids.to_raw(by_row["actor"].to_numpy()) == [a for a, _, _ in good]
    assert log.target_ids.to_raw(by_row["target"].to_numpy()) == [t for _, t, _ in good]
    assert by_row["timestamp"].to_list() == [ts for _, _, ts in good]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_drop_mode_keeps_exactly_the_good_rows_and_counts_the_rest(fmt, data):
    rows = data.draw(lines(fmt))
    path, corrupted, good = _write(fmt, rows)
    try:
        log = load_events(data_config(path, on_bad_rows="drop", **CONFIGS.get(fmt, {})))
    except DataError as error:
        # Text that is not UTF-8 is refused even in drop mode (the file is the wrong
        # encoding, not a bad row), as is a file with no good row left.
        message = str(error)
        if "every row was bad" in message:
            assert not good
        else:
            assert "not valid UTF-8" in message and _named_line(message, path) in corrupted
        return
    assert log.num_events == len(good)
    assert log.report["rows_dropped"] == len(corrupted)
    assert log.events.sort("row")["timestamp"].to_list() == [ts for _, _, ts in good]
