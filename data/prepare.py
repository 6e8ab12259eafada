"""The whole data preparation in one call: log file -> sequences, split and statistics.

    raw file --readers--> fields --events--> canonical, ID-mapped, sorted table
             --sequences--> jagged sequences --> leave-last-out split + target statistics

`prepare(config, out_dir)` also writes the event table, the ID maps and a summary
to `out_dir`, so predictions can be mapped back to raw IDs later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from configs.schema import DataConfig
from data.events import EventLog, load_events, save_event_log
from data.features import TargetFeatures, load_target_features
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
    log: EventLog
    seqs: Sequences
    split: Split
    stats: TargetStats
    features: TargetFeatures | None = None
    _incoming: dict[str, Incoming] = field(default_factory=dict, repr=False, compare=False)
    """Built once per set of known events: validation runs many times in a training run."""

    def incoming_events(self, known: Literal["train", "valid", "test", "all"]) -> Incoming | None:
        """The incoming events the queries of a split may read (see data/incoming.py), or
        None when actors and targets are not one ID space."""
        if not self.log.shared_id_space:
            return None
        # Training queries and validation queries both read the training events.
        events = "valid" if known == "train" else known
        if events not in self._incoming:
            mask = None if events == "all" else self.split.known_mask(self.seqs, events)
            self._incoming[events] = Incoming.from_sequences(self.seqs, mask)
        return self._incoming[events]

    def summary(self) -> dict:
        return {
            "source": self.log.source,
            "events": self.log.num_events,
            "actors": len(self.log.actor_ids),
            "targets": len(self.log.target_ids),
            "action_types": len(self.log.action_values),
            "shared_id_space": self.log.shared_id_space,
            "has_timestamps": self.log.has_timestamps,
            "has_actions": self.log.has_actions,
            "evaluated_actors": int(len(self.split.evaluated)),
            "candidates": int(len(self.stats.candidates)),
            "active_pool": int(len(self.stats.active_pool)),
            **self.log.report,
            **({"target_features": self.features.report} if self.features is not None else {}),
        }


def prepare(config: DataConfig, out_dir: str | Path | None = None) -> PreparedData:
    event_log = load_events(config, resolve_data_path(config.path))
    if out_dir is not None:
        save_event_log(event_log, out_dir)
    prepared = prepare_from_event_log(event_log, config)
    log.debug("prepared %s", prepared.summary())
    return prepared


def prepare_from_event_log(event_log: EventLog, config: DataConfig) -> PreparedData:
    """Sequences, split, statistics (and target features) of an already loaded log."""
    seqs = Sequences.from_event_log(event_log)
    split = Split.leave_last_out(seqs)
    stats = TargetStats.compute(seqs, split, config)
    features = None
    if config.target_features_path is not None:
        features = load_target_features(config, event_log.target_ids, resolve_data_path(config.target_features_path))
    return PreparedData(event_log, seqs, split, stats, features)
