"""The whole data preparation in one call: log file -> sequences, split and statistics.

    raw file --readers--> fields --events--> canonical, ID-mapped, sorted table
             --sequences--> jagged sequences --> leave-last-out split + target statistics

`prepare(config, out_dir)` goes through the prepared dataset in `out_dir` (data/dataset.py:
ID maps, split labels, per-target statistics and events partitioned by actor, written
once and read back), which `python -m data.prepare --config CONFIG` also writes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from configs.schema import DataConfig
import numpy as np
import polars as pl

from data.dataset import (
    SPLIT_LABELS, PreparedDataset, assign_partitions, ensure_prepared, partition_of, target_rows_of_rank,
)
from data.events import EventLog, load_events
from data.features import TargetFeatures, load_target_features
from data.activity import ActivityIndex, TimeRuns
from data.incoming import Incoming
from data.readers import SYNTHETIC_PREFIX, DataError
from data.sequences import Sequences, Split, TargetStats

log = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
EMBEDDED_LOGS = {"collegemsg": "CollegeMsg.txt", "ml-100k": "ml-100k.inter"}


def resolve_data_path(path: str) -> Path | str:
    """`embedded:NAME` -> a log shipped with the package; `synthetic:SPEC` stays as it is
    (the reader generates it); anything else is a filesystem path."""
    if path.startswith(SYNTHETIC_PREFIX):
        return path
    if path.startswith("embedded:"):
        name = path.split(":", 1)[1]
        if name not in EMBEDDED_LOGS:
            raise DataError(f"data.path: unknown embedded log {name!r}; choose one of {', '.join(EMBEDDED_LOGS)}")
        return EMBEDDED_DIR / EMBEDDED_LOGS[name]
    return Path(path).expanduser()


@dataclass(frozen=True)
class PreparedData:
    """A log prepared for training and evaluation: the whole log, or one rank's share of
    it (the actors of its partitions, with the global statistics beside them).

    `log`, `seqs` and `split` hold this share's actors only; `stats` and `known_counts`
    are over every event; `incoming_log`, in a shared ID space, holds the events that
    reached this share's actors (sent by anyone), with their split labels."""

    log: EventLog
    seqs: Sequences
    split: Split
    stats: TargetStats
    features: TargetFeatures | None = None
    valid_counts: np.ndarray | None = None
    """[T] validation events of each target over the whole log (targets.parquet; the
    training counts are `stats.counts`); None when prepared in memory, where the share is
    the whole log and `split` counts it. Of `target_rows` only, when set."""
    target_rows: tuple[int, int] | None = None
    """[start, stop): the targets whose counts and log q (`stats.counts`, `stats.log_q`,
    `valid_counts`) a share read for one of several ranks holds, the rows it ranks the
    baselines over (data/dataset.py `target_rows_of_rank`); None: every target's. The
    masks of `stats` are every target's."""
    incoming_log: pl.DataFrame | None = None
    """Events reaching this share's actors (actor, target, action, timestamp, row, split), from the
    prepared dataset's incoming partitions; None in memory (built from `seqs` then)."""
    totals: dict | None = None
    """The prepared dataset's global counts (events, actors, evaluated actors, ...)."""
    partitions: int = 1
    """P, the number of partitions the actors are hashed into (data/dataset.py)."""
    share: tuple[int, int] = (0, 1)
    """(rank, world size) this data was read for: (0, 1) is the whole log, (-1, -1) the
    partitions of a request's actors."""
    _incoming: dict[str, Incoming] = field(default_factory=dict, repr=False, compare=False)
    """Built once per set of known events: validation runs many times in a training run."""
    _activity: dict[str, ActivityIndex] = field(default_factory=dict, repr=False, compare=False)
    """As `_incoming`."""

    def sequences_of_rank(self, rank: int, world_size: int) -> np.ndarray:
        """[S] bool: which held sequences (actors) are rank `rank`'s of `world_size`: those
        of its partitions. A share read for that rank holds only its own; the whole log
        (in memory, or read for one rank) is split as the prepared dataset splits it."""
        if (rank, world_size) == self.share:
            return np.ones(self.seqs.num_sequences, dtype=bool)
        self._require_split_for(rank, world_size)
        return np.isin(partition_of(self.seqs.actor, self.partitions), self._partitions_of_rank(rank, world_size))

    def _require_split_for(self, rank: int, world_size: int) -> None:
        """Only the whole log, or the share read for this very rank, tells a rank's people."""
        if self.share not in ((0, 1), (rank, world_size)):
            raise ValueError(f"data read for rank {self.share[0]} of {self.share[1]} cannot be split for another")

    def _partitions_of_rank(self, rank: int, world_size: int) -> list[int]:
        if self.totals is not None:
            per_partition = self.totals["events_per_partition"]
        else:
            per_partition = np.bincount(partition_of(self.log.events["actor"].to_numpy(), self.partitions),
                                        minlength=self.partitions).tolist()
        return assign_partitions(per_partition, world_size)[rank]

    def people_of_rank(self, rank: int, world_size: int) -> Callable[[np.ndarray], np.ndarray] | None:
        """people -> bool: which people rank `rank` of `world_size` holds every event of,
        sent and received (those of its partitions; shared ID space); None: every one."""
        if world_size == 1 and self.share == (0, 1):
            return None
        if self.share == (-1, -1):
            raise ValueError("data read for a request's actors holds no one's every event; read the whole log")
        self._require_split_for(rank, world_size)
        owned, partitions = np.asarray(self._partitions_of_rank(rank, world_size)), self.partitions
        return lambda people: np.isin(partition_of(np.asarray(people, dtype=np.int64), partitions), owned)

    def known_counts(self, split: Literal["valid", "test"]) -> np.ndarray:
        """[T] per-target event counts over the events known when the split's queries are
        asked (training events for valid, and the validation events too for test), of
        `target_rows` when set. Read-only: for valid, read from a prepared dataset, it is
        `stats.counts` itself."""
        if self.valid_counts is None:
            counts = self.split.known_counts(self.seqs, split)
        elif split == "test":
            # In int32 when no sum can overflow it: held while the test baselines rank.
            fits = int(self.stats.counts.max(initial=0)) + int(self.valid_counts.max(initial=0)) <= np.iinfo(np.int32).max
            counts = np.add(self.stats.counts, self.valid_counts, dtype=np.int32 if fits else np.int64)
        else:
            counts = self.stats.counts.view()  # not copied
        counts.flags.writeable = False  # read-only however made, so no caller writes into stats.counts
        return counts

    def incoming_events(self, known: Literal["train", "valid", "test", "all"]) -> Incoming | None:
        """The incoming events the queries of a split may read (see data/incoming.py), or
        None when actors and targets are not one ID space."""
        if not self.log.shared_id_space:
            return None
        # Training queries and validation queries both read the training events.
        events = "valid" if known == "train" else known
        if events not in self._incoming:
            if self.incoming_log is not None:
                self._incoming[events] = self._incoming_from_log(events)
            else:
                mask = None if events == "all" else self.split.known_mask(self.seqs, events)
                self._incoming[events] = Incoming.from_sequences(self.seqs, mask)
        return self._incoming[events]

    def activity(self, known: Literal["train", "valid", "test", "all"]) -> ActivityIndex | None:
        """Every held person's known events, sent and received, by time (data/activity.py):
        those the queries of a split may read, as `incoming_events`; None when actors and
        targets are not one ID space."""
        incoming = self.incoming_events(known)
        if incoming is None:
            return None
        events = "valid" if known == "train" else known
        if events not in self._activity:
            seqs = self.seqs
            if np.any(np.diff(seqs.actor) <= 0):  # what finding a person's sequence relies on
                raise ValueError("PreparedData.activity: the sequences must be in ascending actor order")
            known_end = seqs.offsets[1:] if events == "all" else self.split.known_end(seqs, events)
            # Views of the sequences and the incoming events (the known ones a prefix of
            # each sequence), not copies: per person its own events, then those reaching it.
            sent = TimeRuns(seqs.timestamps, seqs.offsets[:-1], known_end, owners=seqs.actor)
            received = TimeRuns(incoming.timestamps, incoming.offsets[:-1], incoming.offsets[1:])
            self._activity[events] = ActivityIndex((sent, received), incoming.num_people)
        return self._activity[events]

    def _incoming_from_log(self, events: Literal["valid", "test", "all"]) -> Incoming:
        # Known events by split label: training ones for valid, training and valid for test.
        highest = {"valid": SPLIT_LABELS["train"], "test": SPLIT_LABELS["valid"], "all": SPLIT_LABELS["test"]}[events]
        known = self.incoming_log.filter(pl.col("split") <= highest)
        return Incoming.from_events(
            receivers=known["target"].to_numpy(), senders=known["actor"].to_numpy(),
            timestamps=known["timestamp"].to_numpy(), num_people=max(self.seqs.num_targets, self.seqs.num_actors),
        )

    def summary(self) -> dict:
        """What was prepared, over the whole log (not this share)."""
        totals = self.totals or {}
        return {
            "source": self.log.source,
            "events": totals.get("events", self.log.num_events),
            "actors": len(self.log.actor_ids),
            "targets": len(self.log.target_ids),
            "action_types": len(self.log.action_values),
            "shared_id_space": self.log.shared_id_space,
            "has_timestamps": self.log.has_timestamps,
            "has_actions": self.log.has_actions,
            "evaluated_actors": totals.get("evaluated_actors", int(len(self.split.evaluated))),
            "candidates": self.stats.num_candidates,
            "active_pool": self.stats.pool_size,
            **self.log.report,
            **({"target_features": self.features.report} if self.features is not None else {}),
        }


def prepared_directory(config: DataConfig, output_dir: str, name: str) -> Path:
    """Where a run's prepared dataset lives: `data.prepared_path`, else in its run directory."""
    if config.prepared_path:
        return Path(config.prepared_path).expanduser()
    return Path(output_dir) / name / "prepared"


def prepare(config: DataConfig, out_dir: str | Path | None = None) -> PreparedData:
    """The log of `config`, prepared. With `out_dir`, through the prepared dataset there
    (written first if missing or stale; data/dataset.py), as training reads it; without,
    in memory: the reference the prepared dataset is tested against."""
    if out_dir is None:
        return prepare_from_event_log(load_events(config, resolve_data_path(config.path)), config)
    return prepare_from_dataset(ensure_prepared(config, out_dir, resolve_data_path(config.path)), config)


def prepare_from_dataset(
    dataset: PreparedDataset, config: DataConfig, rank: int = 0, world_size: int = 1, parts: list[int] | None = None
) -> PreparedData:
    """Rank `rank`'s share of a prepared dataset: the events of its partitions (every
    partition for one rank), the incoming events of their actors, and the global
    statistics. Nothing of the other partitions is read. `parts`: read these partitions
    instead (a request about a few actors reads theirs alone)."""
    if parts is not None and world_size != 1:
        raise ValueError("prepare_from_dataset: give partitions or a rank's share, not both")
    parts = dataset.partitions_of_rank(rank, world_size) if parts is None else sorted(parts)
    event_log = dataset.event_log(parts)
    seqs = Sequences.from_event_log(event_log)
    table = dataset.targets(["target", "train_count", "valid_count", "test_count", "active"])
    features = _target_features(config, event_log)
    stats, valid_counts, target_rows = TargetStats.from_target_table(table, config), _valid_counts(table), None
    del table
    if world_size > 1:
        # Each rank keeps the counts and log q of its own even share of the targets (copies,
        # so the whole arrays go): it ranks the baselines over those targets, and the loss
        # reads log q of any target through every rank (models/samplers.py RowShare).
        target_rows = target_rows_of_rank(len(stats.counts), rank, world_size)
        owned = slice(*target_rows)
        stats = dataclasses.replace(stats, counts=stats.counts[owned].copy(), log_q=stats.log_q[owned].copy())
        valid_counts = valid_counts[owned].copy()
    return PreparedData(
        event_log, seqs, Split.leave_last_out(seqs), stats, features,
        valid_counts=valid_counts, target_rows=target_rows,
        incoming_log=dataset.read_events(parts, "incoming") if event_log.shared_id_space else None,
        totals=dataset.manifest["counts"], partitions=dataset.partitions,
        share=(rank, world_size) if len(parts) == dataset.partitions or world_size > 1 else (-1, -1),
    )


def _valid_counts(table: pl.DataFrame) -> np.ndarray:
    """[T] validation events per target as int32 (leave-last-out gives each actor one
    validation event, so a count is at most the number of actors)."""
    counts = table["valid_count"]
    largest = counts.max() if counts.len() else 0
    if largest > np.iinfo(np.int32).max:
        raise ValueError(f"targets.parquet: valid_count up to {largest:,}, more than one int32 holds")
    return counts.to_numpy().astype(np.int32)


def prepare_from_event_log(event_log: EventLog, config: DataConfig) -> PreparedData:
    """Sequences, split, statistics (and target features) of an already loaded log."""
    seqs = Sequences.from_event_log(event_log)
    split = Split.leave_last_out(seqs)
    stats = TargetStats.compute(seqs, split, config)
    features = _target_features(config, event_log)
    return PreparedData(event_log, seqs, split, stats, features, partitions=config.partitions)


def _target_features(config: DataConfig, event_log: EventLog) -> TargetFeatures | None:
    """The log's sparse target features, when the config names a table of them."""
    if config.target_features_path is None:
        return None
    return load_target_features(config, event_log.target_ids, resolve_data_path(config.target_features_path))


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from configs.loading import ConfigError, load_config, resolve_config_path

    parser = argparse.ArgumentParser(
        prog="data.prepare", description="Prepare a log once: ID maps, split, statistics, partitioned events."
    )
    parser.add_argument("--config", required=True, help="run config (YAML) whose data section names the log")
    parser.add_argument("--out", help="prepared dataset directory (default: <output_dir>/<name>/prepared)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.partitions=128")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(resolve_config_path(args.config), args.overrides)
        out = Path(args.out) if args.out else prepared_directory(config.data, config.output_dir, config.name)
        dataset = ensure_prepared(config.data, out, resolve_data_path(config.data.path))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = dataset.manifest["counts"]
    print(f"{out}: {counts['events']:,} events, {counts['actors']:,} actors, {counts['targets']:,} targets, "
          f"{dataset.partitions} partitions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
