"""The prepared dataset (data/dataset.py) against the in-memory preparation it replaces:
the same events, ID maps, split and statistics; every event in exactly one partition (and,
in a shared ID space, in the incoming partition of its target); rebuilt when stale,
damaged or half-written, never read half-written."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from configs.schema import DataConfig
from data.dataset import (
    MANIFEST,
    SPLIT_LABELS,
    PreparedDataset,
    assign_partitions,
    ensure_prepared,
    partition_of,
    target_rows_of_rank,
)
from data.prepare import main as prepare_main
from data.prepare import prepare, prepare_from_dataset, resolve_data_path
from data.readers import DataError
from data.sequences import TargetStats

ROOT = Path(__file__).resolve().parents[2]


def _assert_same_preparation(reference, prepared) -> None:
    assert reference.log.events.equals(prepared.log.events)
    assert reference.log.actor_ids.raw.equals(prepared.log.actor_ids.raw)
    assert reference.log.target_ids.raw.equals(prepared.log.target_ids.raw)
    assert reference.log.action_values == prepared.log.action_values
    assert reference.log.shared_id_space == prepared.log.shared_id_space
    for name in ("actor", "offsets", "targets", "actions", "timestamps"):
        assert np.array_equal(getattr(reference.seqs, name), getattr(prepared.seqs, name)), name
    assert np.array_equal(reference.split.evaluated, prepared.split.evaluated)
    assert np.array_equal(reference.split.train_end, prepared.split.train_end)
    for name in ("counts", "log_q", "candidates", "active_pool"):
        assert np.array_equal(getattr(reference.stats, name), getattr(prepared.stats, name)), name
    assert reference.summary() == prepared.summary()


def _check_layout(dataset: PreparedDataset, reference) -> None:
    """Partitions cover every event once, sorted, in the partition of their actor; the
    target table holds the split's counts; incoming files hold each person's incoming events."""
    events = reference.log.events
    parts = []
    for part in range(dataset.partitions):
        frame = pl.read_parquet(dataset.directory / "events" / f"part-{part:05d}.parquet")
        assert (partition_of(frame["actor"].to_numpy(), dataset.partitions) == part).all()
        assert frame.equals(frame.sort(["actor", "timestamp", "row"], maintain_order=True))
        parts.append(frame)
    together = pl.concat(parts).sort(["actor", "timestamp", "row"])
    assert together.drop("split").equals(events)
    assert dataset.manifest["counts"]["events_per_partition"] == [p.height for p in parts]

    seqs, split = reference.seqs, reference.split
    labels = np.zeros(len(seqs.targets), dtype=np.int8)
    labels[~split.known_mask(seqs, "valid")] = SPLIT_LABELS["valid"]
    labels[~split.known_mask(seqs, "test")] = SPLIT_LABELS["test"]
    assert np.array_equal(together["split"].to_numpy(), labels)

    targets = dataset.targets()
    assert np.array_equal(targets["train_count"].to_numpy(), split.known_counts(seqs, "valid"))
    assert np.array_equal((targets["train_count"] + targets["valid_count"]).to_numpy(), split.known_counts(seqs, "test"))
    assert targets["test_count"].sum() == len(split.evaluated)

    if dataset.manifest["shared_id_space"]:
        incoming = []
        for part in range(dataset.partitions):
            frame = pl.read_parquet(dataset.directory / "incoming" / f"part-{part:05d}.parquet")
            assert (partition_of(frame["target"].to_numpy(), dataset.partitions) == part).all()
            incoming.append(frame)
        assert pl.concat(incoming).sort(["actor", "timestamp", "row"]).drop("split").equals(events)
    else:
        assert not (dataset.directory / "incoming").exists()


def _assert_prepares_as_in_memory(config: DataConfig, directory: Path) -> None:
    """The prepared dataset of `config` in `directory`, read back whole, against the
    in-memory preparation: the same events, maps, split and statistics, and the layout."""
    reference = prepare(config)
    _assert_same_preparation(reference, prepare(config, directory))
    dataset = PreparedDataset.open(directory)
    _check_layout(dataset, reference)
    stats = TargetStats.from_target_table(dataset.targets(), config)
    for field in ("counts", "log_q", "candidates", "active_pool"):
        assert np.array_equal(getattr(stats, field), getattr(reference.stats, field)), field


@pytest.mark.parametrize("name", ["collegemsg", "ml-100k"])
def test_the_embedded_logs_prepare_to_exactly_the_in_memory_split_and_statistics(tmp_path, name):
    config = DataConfig(path=f"embedded:{name}", partitions=7)
    _assert_prepares_as_in_memory(config, tmp_path / "prepared")


_events = st.lists(
    st.tuples(st.integers(0, 12), st.integers(0, 12), st.sampled_from(["1", "1.0", "2", "10"]), st.integers(0, 40)),
    min_size=1, max_size=60,
)


# No deadline: a prepare writes files, and a loaded machine is slower, not wrong.
@settings(deadline=None)
@given(rows=_events, partitions=st.integers(1, 5), shared=st.booleans(), active=st.sampled_from([0.0, 0.5]),
       deduplicate=st.booleans(), parquet=st.booleans())
def test_drawn_logs_prepare_to_exactly_the_in_memory_split_and_statistics(tmp_path_factory, rows, partitions, shared,
                                                                          active, deduplicate, parquet):
    directory = tmp_path_factory.mktemp("drawn")
    frame = pl.DataFrame(rows, schema=["actor", "target", "action", "timestamp"], orient="row")
    log = directory / ("log.parquet" if parquet else "log.csv")
    frame.write_parquet(log) if parquet else frame.write_csv(log)
    config = DataConfig(path=str(log), shared_id_space=shared, partitions=partitions, active_since_fraction=active,
                        drop_duplicate_events=deduplicate)
    _assert_prepares_as_in_memory(config, directory / "prepared")


@given(counts=st.lists(st.integers(0, 1000), min_size=1, max_size=70), world_size=st.integers(1, 9))
def test_partitions_go_to_ranks_once_each_balanced_by_events(counts, world_size):
    owned = assign_partitions(counts, world_size)
    assert sorted(p for parts in owned for p in parts) == list(range(len(counts)))
    assert owned == assign_partitions(counts, world_size)  # every rank computes the same
    held = [sum(counts[p] for p in parts) for parts in owned]
    # Greedy, largest first: no rank holds more than the lightest one plus one partition.
    assert max(held) - min(held) <= max(counts)


def test_the_partition_hash_is_the_documented_one_and_spreads_contiguous_ids():
    ids = np.arange(100_000)
    expected = ((ids % 2**32) * 2654435761) % 2**32 % 64
    assert np.array_equal(partition_of(ids, 64), expected)
    assert np.array_equal(pl.DataFrame({"id": ids}).select(partition_of(pl.col("id"), 64))["id"].to_numpy(), expected)
    sizes = np.bincount(expected, minlength=64)
    assert sizes.min() >= 0.95 * sizes.mean() and sizes.max() <= 1.05 * sizes.mean()


def _log(tmp_path: Path) -> Path:
    path = tmp_path / "log.txt"
    path.write_text("".join(f"{a} {b} {t}\n" for t, (a, b) in enumerate([(1, 2), (2, 1), (1, 3), (3, 1), (1, 2), (2, 3)])))
    return path


def test_an_unchanged_dataset_is_reused_and_a_stale_one_is_prepared_again(tmp_path):
    log, directory = _log(tmp_path), tmp_path / "prepared"
    config = DataConfig(path=str(log), partitions=3)
    ensure_prepared(config, directory, log)
    written = (directory / MANIFEST).stat().st_mtime_ns
    ensure_prepared(DataConfig(path=str(log), partitions=3, max_len=7), directory, log)  # read-time setting only
    assert (directory / MANIFEST).stat().st_mtime_ns == written

    ensure_prepared(DataConfig(path=str(log), partitions=4), directory, log)  # the data config changed
    assert PreparedDataset.open(directory).partitions == 4

    with open(log, "a") as f:  # the log changed
        f.write("3 2 9\n")
    dataset = ensure_prepared(DataConfig(path=str(log), partitions=4), directory, log)
    assert dataset.manifest["counts"]["events"] == 7


def test_a_directory_of_other_files_is_never_replaced(tmp_path, capsys):
    """Pointed at a folder of the user's own (the log's, say), the prepare step refuses
    rather than clearing it."""
    folder = tmp_path / "mine"
    folder.mkdir()
    log = _log(folder)
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"holds log.txt, notes.txt and no prepared dataset"):
        ensure_prepared(DataConfig(path=str(log)), folder, log)
    assert prepare_main(["--config", "smoke", "--out", str(folder), f"data.path={log}"]) == 2
    assert "not replacing it" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "keep me" and log.exists()


def test_two_prepares_of_one_directory_take_turns(tmp_path):
    log, directory = _log(tmp_path), tmp_path / "prepared"
    config_file = tmp_path / "c.yaml"
    config_file.write_text(f"name: c\ndata:\n  path: {log}\n  partitions: 3\n")
    command = [sys.executable, "-m", "data.prepare", "--config", str(config_file), "--out", str(directory)]
    processes = [subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], errors
    assert PreparedDataset.open(directory).read_events([0, 1, 2]).height == 6
    assert not list(tmp_path.glob(".prepared.tmp*"))


def test_a_half_written_dataset_is_never_read(tmp_path):
    log, directory = _log(tmp_path), tmp_path / "prepared"
    config = DataConfig(path=str(log), partitions=2)
    # A write killed half-way: the temporary directory, and a directory without a manifest.
    (tmp_path / ".prepared.tmp123" / "events").mkdir(parents=True)
    (tmp_path / ".prepared.tmp123" / "events" / "part-00000.parquet").write_bytes(b"half")
    directory.mkdir()
    (directory / "targets.parquet").write_bytes(b"half")
    with pytest.raises(DataError, match="not a prepared dataset"):
        PreparedDataset.open(directory)
    dataset = ensure_prepared(config, directory, log)
    assert dataset.manifest["counts"]["events"] == 6 and not list(tmp_path.glob(".prepared.tmp*"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete", "manifest"])
def test_a_damaged_dataset_fails_in_one_line_naming_the_file_and_is_prepared_again(tmp_path, caplog, damage):
    log, directory = _log(tmp_path), tmp_path / "prepared"
    config = DataConfig(path=str(log), partitions=2)
    ensure_prepared(config, directory, log)
    part = directory / "events" / "part-00001.parquet"
    if damage == "truncate":
        part.write_bytes(part.read_bytes()[:20])
    elif damage == "garbage":
        part.write_bytes(bytes(part.stat().st_size))  # same size: only reading it can tell
    elif damage == "delete":
        part.unlink()
    else:
        (directory / MANIFEST).write_text("{")
    with pytest.raises(DataError) as error:
        PreparedDataset.open(directory).read_events([0, 1])
    message = str(error.value)
    assert "\n" not in message and (str(part) in message or MANIFEST in message)
    dataset = ensure_prepared(config, directory, log)  # rebuilt, with a warning, when the manifest tells
    if damage != "garbage":
        assert dataset.read_events([0, 1]).height == 6


def _incoming_windows(prepared, known: str, receivers: np.ndarray, before: np.ndarray) -> list:
    incoming = prepared.incoming_events(known)
    flat, lengths = incoming.window(receivers, before, max_len=1000)
    bounds = np.r_[0, np.cumsum(lengths)]
    return [
        list(zip(incoming.sources[flat[a:b]].tolist(), incoming.timestamps[flat[a:b]].tolist()))
        for a, b in zip(bounds[:-1], bounds[1:])
    ]


@pytest.mark.parametrize("world_size", [1, 3])
def test_a_share_holds_its_actors_their_incoming_events_and_the_global_statistics(tmp_path, world_size):
    config = DataConfig(path="embedded:collegemsg", partitions=8)
    reference = prepare(config)
    dataset = ensure_prepared(config, tmp_path / "prepared", resolve_data_path(config.path))
    shares = [prepare_from_dataset(dataset, config, rank, world_size) for rank in range(world_size)]
    actors = [set(share.seqs.actor.tolist()) for share in shares]
    assert set.union(*actors) == set(reference.seqs.actor.tolist())
    assert sum(map(len, actors)) == len(reference.seqs.actor)  # each actor on one rank
    assert sum(share.log.num_events for share in shares) == reference.log.num_events
    people = np.arange(reference.seqs.num_targets)
    for rank, (share, owned) in enumerate(zip(shares, actors)):
        assert share.summary() == reference.summary()  # the whole log's figures, on every rank
        # The counts (the baselines') of its own targets on several ranks; the rest whole.
        rows = slice(*target_rows_of_rank(reference.seqs.num_targets, rank, world_size)) if world_size > 1 else slice(None)
        assert share.seqs.num_targets == reference.seqs.num_targets
        assert share.target_rows == (None if world_size == 1 else (rows.start, rows.stop))
        for split in ("valid", "test"):
            assert np.array_equal(share.known_counts(split), reference.known_counts(split)[rows])
        assert np.array_equal(share.stats.counts, reference.stats.counts[rows])
        assert np.array_equal(share.stats.log_q, reference.stats.log_q[rows])
        for field in ("candidates", "active_pool"):
            assert np.array_equal(getattr(share.stats, field), getattr(reference.stats, field)), field
        # The events that reached the share's actors, as the whole log's would show them,
        # for every set of known events and query time.
        mine = np.array(sorted(owned))
        for known in ("valid", "test", "all"):
            for before in (0, 10**8, 10**10):
                at = np.full(len(mine), before)
                assert _incoming_windows(share, known, mine, at) == _incoming_windows(reference, known, mine, at)
        # ... and nothing that reached the people of other ranks' partitions.
        others = people[~np.isin(partition_of(people, 8), dataset.partitions_of_rank(rank, world_size))]
        assert _incoming_windows(share, "all", others, np.full(len(others), 10**10)) == [[]] * len(others)


def test_the_prepare_command_writes_the_dataset(tmp_path, capsys):
    out = tmp_path / "prepared"
    assert prepare_main(["--config", "smoke", "--out", str(out), "data.partitions=4"]) == 0
    assert "1,899 actors" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["partitions"] == 4 and manifest["data_config"]["path"] == "embedded:collegemsg"
    assert sorted(os.listdir(out / "events")) == [f"part-{p:05d}.parquet" for p in range(4)]
    assert prepare_main(["--config", "smoke", "--out", str(out), "data.partitions=0"]) == 2
    assert "data.partitions" in capsys.readouterr().err


def test_counts_are_int32_unless_a_count_outgrows_it():
    """Every rank holds per-target counts (its share of them on several ranks): int32
    halves them, and a count (or a training plus validation sum) beyond int32 keeps them
    exact in int64."""
    config = DataConfig(path="embedded:collegemsg")
    small = pl.DataFrame({"target": [0, 1], "train_count": [3, 0], "valid_count": [1, 1], "test_count": [0, 1],
                          "active": [True, False]})
    assert TargetStats.from_target_table(small, config).counts.dtype == np.int32
    huge = small.with_columns(train_count=pl.Series([2**31 + 5, 0]))
    counts = TargetStats.from_target_table(huge, config).counts
    assert counts.dtype == np.int64 and counts.tolist() == [2**31 + 5, 0]

    reference = prepare(config)
    assert reference.stats.counts.dtype == np.int32
    near = np.iinfo(np.int32).max
    for train, expected_dtype in ((near - 1, np.int32), (near, np.int64)):
        stats = dataclasses.replace(reference.stats, counts=np.array([train, 0], dtype=np.int32))
        shared = dataclasses.replace(reference, stats=stats, valid_counts=np.array([1, 1], dtype=np.int32))
        test_counts = shared.known_counts("test")
        assert test_counts.dtype == expected_dtype and test_counts.tolist() == [train + 1, 1]
