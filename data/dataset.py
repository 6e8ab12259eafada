"""The prepared dataset: a raw log read, checked, ID-mapped, split and counted once, laid
out on disk so that each rank reads only its share. Training and `trainer.predict` read
this directory, never the raw log.

Layout (parquet; a contract, so another engine, e.g. Spark, can write it for a log
beyond one machine's disk):

    manifest.json              written last: schema version, the data config and the source
                               files' fingerprints it was built from, counts, P, every file's size
    actor_ids.parquet          index int64, raw (int64 or string): raw ID of each actor index
    target_ids.parquet         the same for targets (absent when actors and targets share
                               one ID space: then actor_ids.parquet maps both)
    action_types.parquet       index int32, raw string: the action type of each action index
    targets.parquet            one row per target index: train_count, valid_count, test_count
                               (events of each split label), last_seen (newest training event,
                               null if none), active (in the random-negative pool)
    events/part-00000.parquet  the events, partitioned by actor into P files:
      ...                        actor int64, target int64, action int32, timestamp int64,
                                 row int64, split int8 (0 train, 1 valid, 2 test);
                                 each file sorted by (actor, timestamp, row)
    incoming/part-00000.parquet  when actors and targets share an ID space: the same events
      ...                        partitioned by *target* into P files, sorted by (target,
                                 timestamp, actor, row), so the rank that owns a person reads
                                 the events that reached them without reading the rest

Partition of an ID: `((id mod 2^32) * 2654435761 mod 2^32) mod P` (Knuth's multiplicative
hash: contiguous indices spread evenly; in Spark SQL `pmod(pmod(id, 4294967296) *
2654435761, 4294967296) % P`). The split label is the benchmark's leave-last-out: an actor
with n >= 3 events has its event n as test and n-1 as valid; everything else is training.

The directory is written under a temporary name beside its place and renamed when
complete (manifest last), so a half-written dataset is never read. It is stale, and
rebuilt, when the data config or a source file (size, modification time) changes.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from configs.schema import DataConfig
from data.events import EventLog, IdMap
from data.readers import SYNTHETIC_PREFIX, DataError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPLIT_LABELS = {"train": 0, "valid": 1, "test": 2}
_HASH_MULTIPLIER = 2654435761
# DataConfig fields that change what is prepared; the others (max_len, the logQ exponent,
# target features) are applied when the dataset is read, so runs that differ only in them
# share one prepared dataset.
PREPARED_FIELDS = (
    "path", "format", "header", "actor_column", "target_column", "action_column", "timestamp_column", "id_type",
    "shared_id_space", "on_bad_rows", "drop_duplicate_events", "active_since_fraction", "active_since_date",
    "partitions",
)


def partition_of(ids: np.ndarray | pl.Expr, partitions: int):
    """The partition of each ID (numpy array or polars expression): see the module docstring."""
    if isinstance(ids, pl.Expr):
        low = ids.cast(pl.UInt64) % (1 << 32)
        return ((low * _HASH_MULTIPLIER) % (1 << 32) % partitions).cast(pl.Int64)
    low = np.asarray(ids).astype(np.uint64) % np.uint64(1 << 32)
    return ((low * np.uint64(_HASH_MULTIPLIER)) % np.uint64(1 << 32) % np.uint64(partitions)).astype(np.int64)


def target_rows_of_rank(num_targets: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of the target IDs whose per-target counts rank `rank` of `world_size`
    keeps, and ranks the baselines over: an even split of the IDs, independent of the ID
    tables' sharding plan."""
    return num_targets * rank // world_size, num_targets * (rank + 1) // world_size


def assign_partitions(events_per_partition: list[int], world_size: int) -> list[list[int]]:
    """Partitions of each rank, balanced by event count: the largest partition first, each
    to the rank holding the fewest events so far (ties: the lower rank). Deterministic, so
    every rank computes the same assignment from the manifest."""
    held = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for part in sorted(range(len(events_per_partition)), key=lambda p: (-events_per_partition[p], p)):
        rank = min(range(world_size), key=lambda r: (held[r], r))
        owned[rank].append(part)
        held[rank] += events_per_partition[part]
    return [sorted(parts) for parts in owned]


def _part_name(part: int) -> str:
    return f"part-{part:05d}.parquet"


# ---------------------------------------------------------------- fingerprints


def prepared_config(config: DataConfig) -> dict:
    """The data config fields the prepared dataset depends on."""
    values = dataclasses.asdict(config)
    return {key: values[key] for key in PREPARED_FIELDS}


def source_fingerprint(path: str | Path) -> list[dict]:
    """Size and modification time of every file the log is read from (a synthetic log is
    its spec, which is in the config)."""
    if str(path).startswith(SYNTHETIC_PREFIX):
        return []
    path = Path(path)
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file()) if path.is_dir() else [path]
    fingerprint = []
    for file in files:
        stat = file.stat()
        fingerprint.append({"path": str(file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return fingerprint


# ------------------------------------------------------------------- writing


def split_labels(actor: np.ndarray) -> np.ndarray:
    """[N] int8 split label of events sorted by actor (then time): leave-last-out."""
    n = len(actor)
    starts = np.flatnonzero(np.r_[True, actor[1:] != actor[:-1]]) if n else np.zeros(0, dtype=np.int64)
    lengths = np.diff(np.r_[starts, n])
    labels = np.zeros(n, dtype=np.int8)
    ends = starts + lengths
    evaluated = lengths >= 3
    labels[ends[evaluated] - 1] = SPLIT_LABELS["test"]
    labels[ends[evaluated] - 2] = SPLIT_LABELS["valid"]
    return labels


@dataclass
class _TargetCounts:
    """Per-target statistics accumulated partition by partition: arrays of the target
    vocabulary's size, never the events."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    last_seen: np.ndarray  # newest training event, -1 for none

    @classmethod
    def zeros(cls, num_targets: int) -> _TargetCounts:
        return cls(*(np.zeros(num_targets, dtype=np.int64) for _ in range(3)), np.full(num_targets, -1, np.int64))

    def add(self, events: pl.DataFrame) -> None:
        target, split = events["target"].to_numpy(), events["split"].to_numpy()
        for counts, label in ((self.train, 0), (self.valid, 1), (self.test, 2)):
            counts += np.bincount(target[split == label], minlength=len(counts))
        newest = events.filter(pl.col("split") == 0).group_by("target").agg(pl.col("timestamp").max())
        index = newest["target"].to_numpy()
        self.last_seen[index] = np.maximum(self.last_seen[index], newest["timestamp"].to_numpy())

    def table(self, cutoff: int) -> pl.DataFrame:
        last_seen = pl.Series("last_seen", self.last_seen)
        return pl.DataFrame({
            "target": np.arange(len(self.train), dtype=np.int64),
            "train_count": self.train, "valid_count": self.valid, "test_count": self.test,
            "last_seen": last_seen.set(last_seen < 0, None),
            "active": (self.last_seen >= 0) & (self.last_seen >= cutoff),
        })


def write_dataset(config: DataConfig, source_path: str | Path, directory: Path, fingerprint: list[dict]) -> None:
    """Prepare the log at `source_path` into `directory`, out of core: the log streams
    through polars' streaming engine (checks, ID mapping, a partitioned sink), then each
    partition is sorted, split and counted on its own, so memory follows the largest
    partition and the ID vocabularies, not the log. Atomic: a temporary directory renamed.
    (SNAP and .inter text logs are read into memory by their readers first.)"""
    from data.events import map_actions, type_events_lazily  # the in-memory path's typing and action rules
    from data.readers import read_log
    from data.sequences import active_cutoff

    directory = Path(directory)
    # Our own name (a process killed mid-write leaves one; the next write clears those).
    for stale in directory.parent.glob(f".{directory.name}.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    (tmp / "events").mkdir(parents=True)
    partitions = config.partitions

    raw = read_log(source_path, config)
    typed, report = type_events_lazily(raw, config)
    shared = raw.actors_are_targets if config.shared_id_space is None else config.shared_id_space

    # The vocabularies (distinct IDs, sorted), then every ID replaced by its index.
    if shared:
        people = pl.concat([typed.select(raw=pl.col("actor")), typed.select(raw=pl.col("target"))])
        actor_ids = target_ids = IdMap(people.unique().collect(engine="streaming")["raw"].sort())
    else:
        actor_ids = IdMap(typed.select(raw=pl.col("actor")).unique().collect(engine="streaming")["raw"].sort())
        target_ids = IdMap(typed.select(raw=pl.col("target")).unique().collect(engine="streaming")["raw"].sort())
    distinct_actions = typed.select("action").unique().collect(engine="streaming")["action"]
    action_index, action_values = map_actions(distinct_actions)
    mapped = (
        typed.join(_index_frame(actor_ids, "actor"), on="actor", how="left")
        .join(_index_frame(target_ids, "target"), on="target", how="left")
        .join(pl.LazyFrame({"action": distinct_actions, "_action": action_index}), on="action", how="left",
              nulls_equal=True)
        .select(
            actor=pl.col("_actor"), target=pl.col("_target"), action=pl.col("_action").cast(pl.Int32),
            timestamp=pl.col("timestamp").cast(pl.Int64), row=pl.col("row").cast(pl.Int64),
        )
    )
    _sink_partitioned(mapped, "actor", tmp / "_events", partitions)

    counts = _TargetCounts.zeros(len(target_ids))
    events_per_partition, events_per_action = [0] * partitions, np.zeros(len(action_values), dtype=np.int64)
    span: list[int] = []  # each partition's oldest and newest time
    duplicates = 0
    for part in range(partitions):
        events = _read_sunk(tmp / "_events", part, mapped)
        if config.drop_duplicate_events:
            # The first of equal events in file order: duplicates share their actor, so
            # they share a partition.
            before = events.height
            events = events.sort("row").unique(subset=["actor", "target", "action", "timestamp"], keep="first",
                                               maintain_order=True)
            duplicates += before - events.height
        events = events.sort(["actor", "timestamp", "row"])
        events = events.with_columns(split=pl.Series(split_labels(events["actor"].to_numpy())))
        events.write_parquet(tmp / "events" / _part_name(part))
        counts.add(events)
        events_per_partition[part] = events.height
        events_per_action += np.bincount(events["action"].to_numpy(), minlength=len(action_values))
        if events.height:
            span += [int(events["timestamp"].min()), int(events["timestamp"].max())]
    shutil.rmtree(tmp / "_events")
    if config.drop_duplicate_events:
        report["duplicates_dropped"] = duplicates
        log.info("%s: dropped %d duplicate event(s)", raw.source, duplicates)

    if shared:  # the same events again, partitioned by who they reached
        (tmp / "incoming").mkdir()
        events = pl.scan_parquet(tmp / "events" / "*.parquet")
        _sink_partitioned(events, "target", tmp / "_incoming", partitions)
        for part in range(partitions):
            incoming = _read_sunk(tmp / "_incoming", part, events).sort(["target", "timestamp", "actor", "row"])
            incoming.write_parquet(tmp / "incoming" / _part_name(part))
        shutil.rmtree(tmp / "_incoming")

    low, high = (min(span), max(span)) if span else (0, 0)
    cutoff = active_cutoff(np.array([low, high]), config) if span else 0
    counts.table(cutoff).write_parquet(tmp / "targets.parquet")
    _write_ids(tmp / "actor_ids.parquet", actor_ids)
    if not shared:
        _write_ids(tmp / "target_ids.parquet", target_ids)
    pl.DataFrame(
        {"index": np.arange(len(action_values), dtype=np.int32), "raw": action_values}
    ).write_parquet(tmp / "action_types.parquet")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "data_config": prepared_config(config),
        "sources": fingerprint,
        "source": raw.source,
        "partitions": partitions,
        "shared_id_space": shared,
        "has_timestamps": "timestamp" in raw.fields,
        "has_actions": "action" in raw.fields,
        "report": report,
        "counts": {
            "events": sum(events_per_partition),
            "actors": len(actor_ids),
            "targets": len(target_ids),
            "action_types": len(action_values),
            "evaluated_actors": int(counts.test.sum()),
            "min_timestamp": low,
            "max_timestamp": high,
            "events_per_partition": events_per_partition,
            "events_per_action": events_per_action.tolist(),
        },
    }
    manifest["files"] = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*.parquet"))}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.replace(old)
    tmp.replace(directory)
    shutil.rmtree(old, ignore_errors=True)


def _index_frame(ids: IdMap, column: str) -> pl.LazyFrame:
    """raw ID -> index, to join on `column`."""
    return pl.LazyFrame({column: ids.raw, f"_{column}": np.arange(len(ids), dtype=np.int64)})


def _sink_partitioned(frame: pl.LazyFrame, key: str, folder: Path, partitions: int) -> None:
    """Stream `frame` into `folder/_part=<p>/` files by the partition of column `key`."""
    frame.with_columns(_part=partition_of(pl.col(key), partitions)).sink_parquet(
        pl.PartitionBy(folder, key="_part", include_key=False, max_rows_per_file=1 << 18),
        engine="streaming", mkdir=True,
    )


def _read_sunk(folder: Path, part: int, like: pl.LazyFrame) -> pl.DataFrame:
    """Partition `part` of a partitioned sink (empty, with `like`'s columns, if nothing went there)."""
    files = sorted((folder / f"_part={part}").glob("*.parquet"))
    if not files:
        return like.clear().collect()
    return pl.read_parquet(files)


def _write_ids(path: Path, ids: IdMap) -> None:
    pl.DataFrame({"index": np.arange(len(ids), dtype=np.int64), "raw": ids.raw}).write_parquet(path)


# ------------------------------------------------------------------- reading


@dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset directory and its manifest; reads the whole or a rank's share."""

    directory: Path
    manifest: dict

    @classmethod
    def open(cls, directory: str | Path) -> PreparedDataset:
        directory = Path(directory)
        path = directory / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"{directory}: not a prepared dataset (no {MANIFEST}); run python -m data.prepare") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable ({e}); delete {directory} to prepare it again") from None
        if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
            raise DataError(
                f"{path}: schema version {manifest.get('schema_version') if isinstance(manifest, dict) else '?'}, "
                f"this code reads {SCHEMA_VERSION}; delete {directory} to prepare it again"
            )
        for name, size in manifest.get("files", {}).items():
            file = directory / name
            actual = file.stat().st_size if file.is_file() else None
            if actual != size:
                found = "missing" if actual is None else f"{actual} bytes, the manifest says {size}"
                raise DataError(f"{file}: damaged ({found}); delete {directory} to prepare it again")
        return cls(directory, manifest)

    def is_current(self, config: DataConfig, fingerprint: list[dict]) -> bool:
        return self.manifest.get("data_config") == prepared_config(config) and self.manifest.get("sources") == fingerprint

    @property
    def partitions(self) -> int:
        return int(self.manifest["partitions"])

    def partitions_of_rank(self, rank: int, world_size: int) -> list[int]:
        return assign_partitions(self.manifest["counts"]["events_per_partition"], world_size)[rank]

    def _read(self, name: str, **kwargs) -> pl.DataFrame:
        path = self.directory / name
        try:
            return pl.read_parquet(path, **kwargs)
        except (pl.exceptions.PolarsError, OSError) as e:
            raise DataError(f"{path}: not readable as parquet ({str(e).splitlines()[0]}); delete {self.directory} "
                            "to prepare it again") from None

    def read_events(self, parts: list[int], folder: str = "events") -> pl.DataFrame:
        """The events of partitions `parts`, sorted by actor (then time and row) across them,
        as one process reading every partition would order them."""
        frames = [self._read(f"{folder}/{_part_name(p)}") for p in sorted(parts)]
        events = pl.concat(frames) if frames else self._read(f"{folder}/{_part_name(0)}").clear()
        key = ["actor", "timestamp", "row"] if folder == "events" else ["target", "timestamp", "actor", "row"]
        return events.sort(key, maintain_order=True)

    def id_maps(self) -> tuple[IdMap, IdMap]:
        """The actor and target ID maps, read when their raw IDs are first asked for."""
        actor_ids = self._id_map("actor_ids.parquet")
        shared = self.manifest["shared_id_space"]
        target_ids = actor_ids if shared else self._id_map("target_ids.parquet")
        return actor_ids, target_ids

    def _id_map(self, name: str) -> IdMap:
        path = self.directory / name
        try:
            size = pq.read_metadata(path).num_rows
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: not readable as parquet ({str(e).splitlines()[0]}); delete {self.directory} "
                            "to prepare it again") from None
        return IdMap.stored(size, lambda: self._read(name, columns=["raw"])["raw"])

    def action_values(self) -> list[str]:
        return self._read("action_types.parquet")["raw"].to_list()

    def targets(self, columns: list[str] | None = None) -> pl.DataFrame:
        return self._read("targets.parquet", columns=columns)

    def event_log(self, parts: list[int] | None = None) -> EventLog:
        """The events of `parts` (every partition when None) as an EventLog."""
        parts = list(range(self.partitions)) if parts is None else parts
        actor_ids, target_ids = self.id_maps()
        return EventLog(
            events=self.read_events(parts).drop("split"),
            actor_ids=actor_ids,
            target_ids=target_ids,
            action_values=self.action_values(),
            shared_id_space=self.manifest["shared_id_space"],
            has_timestamps=self.manifest["has_timestamps"],
            has_actions=self.manifest["has_actions"],
            source=self.manifest["source"],
            report=self.manifest["report"],
        )


# What a prepared dataset directory may hold, in this layout or the one before it
# (events.parquet + meta.json): only such a directory is ever replaced.
_OWN_NAMES = {
    MANIFEST, "actor_ids.parquet", "target_ids.parquet", "action_types.parquet", "targets.parquet", "events",
    "incoming", "events.parquet", "meta.json",
}


def ensure_prepared(config: DataConfig, directory: str | Path, source_path: str | Path) -> PreparedDataset:
    """The prepared dataset of `config` in `directory`, prepared now if missing, stale or
    unreadable (a damaged one is rebuilt, with a warning). Processes preparing the same
    directory take turns (an flock beside it): the second finds the first's dataset
    current. A directory that holds anything but a prepared dataset is never replaced."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_name(f".{directory.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        return _ensure_prepared_locked(config, directory, source_path)


def _ensure_prepared_locked(config: DataConfig, directory: Path, source_path: str | Path) -> PreparedDataset:
    source_missing = not str(source_path).startswith(SYNTHETIC_PREFIX) and not Path(source_path).exists()
    if (directory / MANIFEST).exists():
        try:
            dataset = PreparedDataset.open(directory)
            if source_missing:
                # Prepared elsewhere (another machine, another engine) or the log moved:
                # nothing to compare with, and nothing to prepare from.
                log.warning("%s: the log %s is not here; using the prepared dataset as it is", directory, source_path)
                return dataset
            if dataset.is_current(config, source_fingerprint(source_path)):
                return dataset
            log.info("%s: stale (the data config or the log changed); preparing it again", directory)
        except DataError as e:
            if source_missing:
                raise
            log.warning("%s; preparing it again", e)
    elif directory.exists():
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in _OWN_NAMES)
        if foreign:
            raise DataError(
                f"{directory}: holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''} and no prepared "
                f"dataset ({MANIFEST}); not replacing it: point data.prepared_path (or --out) at an empty or new "
                "directory"
            )
        log.info("%s: holds no complete prepared dataset; preparing it", directory)
    if source_missing:
        raise DataError(f"{source_path}: no such file or directory (data.path)")
    write_dataset(config, source_path, directory, source_fingerprint(source_path))
    return PreparedDataset.open(directory)
