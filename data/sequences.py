"""Event table -> jagged per-actor sequences, the benchmark split, and target statistics.

Layout (values + offsets, never padded in storage):

    sequence s = events offsets[s] .. offsets[s+1]-1 of actor actor[s],
    sorted by (timestamp, row in the file)

    offsets  = [0,        3,     5,          9]
    targets  = [t t t     t t    t t t t]
                actor 0   act 1  actor 2

The split follows ../shared/BENCHMARK.md (leave-last-out): an actor with n >= 3
events is evaluated, its event n is the test event and n-1 the validation event;
events 1..n-2 (all n events for other actors) are training data. A query's history
is every earlier event of the actor; truncation to `max_len` happens at batch time.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

from configs.schema import DataConfig
from data.events import EventLog

SplitName = Literal["train", "valid", "test"]


@dataclass(frozen=True)
class Sequences:
    """Every actor's events, jagged. Flat arrays are [N]; per-sequence arrays are [S]."""

    actor: np.ndarray  # [S] int64 actor index of each sequence
    offsets: np.ndarray  # [S + 1] int64
    targets: np.ndarray  # [N] int64
    actions: np.ndarray  # [N] int32
    timestamps: np.ndarray  # [N] int64
    num_targets: int  # size of the target vocabulary (ID table rows)
    num_actors: int
    num_actions: int

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_sequences(self) -> int:
        return len(self.actor)

    @classmethod
    def from_event_log(cls, log: EventLog) -> Sequences:
        events = log.events  # sorted by (actor, timestamp, row)
        actor_col = events["actor"].to_numpy()
        starts = np.flatnonzero(np.r_[True, actor_col[1:] != actor_col[:-1]]) if len(actor_col) else np.zeros(0, int)
        return cls(
            actor=actor_col[starts].astype(np.int64),
            offsets=np.r_[starts, len(actor_col)].astype(np.int64),
            targets=events["target"].to_numpy().astype(np.int64, copy=False),
            actions=events["action"].to_numpy().astype(np.int32, copy=False),
            timestamps=events["timestamp"].to_numpy().astype(np.int64, copy=False),
            num_targets=len(log.target_ids),
            num_actors=len(log.actor_ids),
            num_actions=len(log.action_values),
        )


@dataclass(frozen=True)
class Queries:
    """Prediction queries: predict the event at flat position `position[i]` from the
    actor's earlier events `history_start[i] .. position[i]-1` (before truncation)."""

    sequence: np.ndarray  # [Q] sequence index
    position: np.ndarray  # [Q] flat index of the event to predict
    history_start: np.ndarray  # [Q] flat index of the actor's first event
    next_action: np.ndarray | None = None
    """[Q] for requests about an event not in the log (inference): its action type."""
    next_timestamp: np.ndarray | None = None
    """[Q] for requests: when the next event happens."""

    @classmethod
    def requests(
        cls, seqs: "Sequences", sequence: np.ndarray, next_action: np.ndarray, newest: int | None = None
    ) -> "Queries":
        """Ask for the event after each actor's last known one (history = the whole log of
        the actor), with the given next action type, asked one second after the log's newest
        event (what "now" is for a model trained on the whole log). `newest`: the log's
        newest time, when `seqs` hold only part of it."""
        end = seqs.offsets[sequence + 1]
        if newest is None:
            newest = int(seqs.timestamps.max()) if len(seqs.timestamps) else -1
        now = newest + 1
        return cls(
            sequence=sequence,
            position=end,
            history_start=seqs.offsets[sequence],
            next_action=next_action.astype(np.int64),
            next_timestamp=np.full(len(sequence), now, dtype=np.int64),
        )

    def __len__(self) -> int:
        return len(self.position)

    def subset(self, keep: np.ndarray) -> Queries:
        """The queries `keep` selects (a bool mask or indices), in their order."""
        def pick(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else values[keep]

        return Queries(
            sequence=self.sequence[keep], position=self.position[keep], history_start=self.history_start[keep],
            next_action=pick(self.next_action), next_timestamp=pick(self.next_timestamp),
        )


@dataclass(frozen=True)
class Split:
    """The leave-last-out split, as positions into `Sequences`' flat arrays."""

    evaluated: np.ndarray  # [E] sequence indices of evaluated actors (n >= 3)
    train_end: np.ndarray  # [S] exclusive end of each sequence's training events

    @classmethod
    def leave_last_out(cls, seqs: Sequences) -> Split:
        lengths = seqs.lengths
        evaluated = np.flatnonzero(lengths >= 3)
        train_end = seqs.offsets[1:].copy()
        train_end[evaluated] -= 2
        return cls(evaluated=evaluated, train_end=train_end)

    def queries(self, seqs: Sequences, split: Literal["valid", "test"], max_queries: int = 0) -> Queries:
        """One query per evaluated actor: its second-to-last event (valid) or last (test).
        `max_queries` > 0 evaluates a fixed random sample of that many actors instead (the
        same actors for both splits and every call), for vocabularies where exact full
        ranking of every actor costs more than a validation is worth."""
        evaluated = self.evaluated
        if 0 < max_queries < len(evaluated):
            chosen = np.random.default_rng(0).choice(len(evaluated), size=max_queries, replace=False)
            evaluated = evaluated[np.sort(chosen)]
        ends = seqs.offsets[1:][evaluated]
        position = ends - (1 if split == "test" else 2)
        return Queries(sequence=evaluated, position=position, history_start=seqs.offsets[:-1][evaluated])

    def train_queries(self, seqs: Sequences, min_history: int = 1) -> Queries:
        """Every training event with at least `min_history` earlier events of its actor."""
        starts = seqs.offsets[:-1] + min_history
        counts = np.maximum(self.train_end - starts, 0)
        sequence = np.repeat(np.arange(seqs.num_sequences), counts)
        position = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(starts, counts)
        return Queries(sequence=sequence, position=position, history_start=seqs.offsets[:-1][sequence])

    def train_mask(self, seqs: Sequences) -> np.ndarray:
        """[N] bool: which flat events are training events."""
        return self.known_mask(seqs, "valid")

    def known_mask(self, seqs: Sequences, split: Literal["valid", "test"]) -> np.ndarray:
        """[N] bool: the events known when the split's queries are asked: training events
        for validation, training and validation events for test."""
        index = np.arange(len(seqs.targets))
        sequence_of = np.repeat(np.arange(seqs.num_sequences), seqs.lengths)
        return index < self.known_end(seqs, split)[sequence_of]

    def known_end(self, seqs: Sequences, split: Literal["valid", "test"]) -> np.ndarray:
        """[S] exclusive end (a flat index) of each sequence's events known when the split's
        queries are asked: they are a prefix of the sequence."""
        return self.train_end if split == "valid" else self.train_end + (seqs.lengths >= 3)

    def known_counts(self, seqs: Sequences, split: Literal["valid", "test"]) -> np.ndarray:
        """[T] per-target event counts over `known_mask`: what popularity means at query time
        (the reference most-popular figures count validation events for the test split)."""
        return np.bincount(seqs.targets[self.known_mask(seqs, split)], minlength=seqs.num_targets)


@dataclass(frozen=True)
class TargetStats:
    """Target frequencies over training events, for popularity, logQ and the random pool."""

    counts: np.ndarray  # [T] training-event count of each target index (`narrowest_counts`); a share read
    # for one of several ranks keeps its `PreparedData.target_rows` only, as for log_q
    log_q: np.ndarray  # [T] float32 log of the normalised sampling probability q(i) ∝ max(count, floor)^exponent
    # (computed in float64; float32 is what the loss reads, so the model shares this array)
    num_targets: int
    candidate_bits: np.ndarray
    """[ceil(T / 8)] uint8: `np.packbits` of the [T] bool "the target appears anywhere in
    the log" (a ranking candidate). Every rank holds it, and a rank ranks only its own
    candidates (`candidates_in`): 1.25 MB at 1e7 targets, where the bool mask took 10 and
    the IDs 80 (per rank, whatever the number of ranks)."""
    active_bits: np.ndarray
    """[ceil(T / 8)] uint8: packed "last seen in training at or after the cut-off" (the
    random negatives' pool). Bits, not the pool's IDs: without random negatives (the
    default) nothing needs the IDs (68 MB at 1e7 targets)."""

    @classmethod
    def of_masks(cls, counts: np.ndarray, log_q: np.ndarray, is_candidate: np.ndarray, active: np.ndarray) -> TargetStats:
        """From the [T] bool masks (packed here)."""
        if len(is_candidate) != len(active):
            raise ValueError(f"TargetStats: {len(is_candidate)} candidate flags but {len(active)} pool flags")
        return cls(
            counts=counts, log_q=log_q, num_targets=len(is_candidate),
            candidate_bits=np.packbits(is_candidate), active_bits=np.packbits(active),
        )

    @property
    def is_candidate(self) -> np.ndarray:
        """[T] bool, unpacked (a new array at every call)."""
        return np.unpackbits(self.candidate_bits, count=self.num_targets).view(bool)

    @property
    def active(self) -> np.ndarray:
        """[T] bool: the random negatives' pool, unpacked (a new array at every call)."""
        return np.unpackbits(self.active_bits, count=self.num_targets).view(bool)

    @property
    def candidates(self) -> np.ndarray:
        """[C] int64 every candidate's target index, ascending (a new array at every call)."""
        return self.candidates_in(0, self.num_targets)

    def candidates_in(self, start: int, stop: int) -> np.ndarray:
        """[C'] int64 the candidates among target indices start .. stop - 1, ascending."""
        start, stop = max(start, 0), min(stop, self.num_targets)
        if start >= stop:
            return np.zeros(0, dtype=np.int64)
        first_byte = start // 8  # unpack only the bytes holding start .. stop - 1
        flags = np.unpackbits(self.candidate_bits[first_byte : (stop + 7) // 8])
        ids = np.flatnonzero(flags[start - 8 * first_byte : stop - 8 * first_byte])
        ids += start
        return ids

    @property
    def active_pool(self) -> np.ndarray:
        """[P] int64 the pool's target indices, ascending (a new array at every call)."""
        return np.flatnonzero(self.active)

    @property
    def num_candidates(self) -> int:
        return int(np.bitwise_count(self.candidate_bits).sum(dtype=np.int64))  # packbits pads with 0

    @property
    def pool_size(self) -> int:
        return int(np.bitwise_count(self.active_bits).sum(dtype=np.int64))

    @classmethod
    def compute(cls, seqs: Sequences, split: Split, config: DataConfig) -> TargetStats:
        train = split.train_mask(seqs)
        frame = pl.DataFrame({"target": seqs.targets[train], "timestamp": seqs.timestamps[train]})
        last_seen = frame.group_by("target").agg(pl.col("timestamp").max().alias("last_seen"))
        counts = narrowest_counts(np.bincount(seqs.targets[train], minlength=seqs.num_targets))

        log_q = sampling_log_q(counts, config)

        is_candidate = np.bincount(seqs.targets, minlength=seqs.num_targets) > 0
        cutoff = active_cutoff(seqs.timestamps, config)
        active = np.zeros(seqs.num_targets, dtype=bool)
        active[last_seen.filter(pl.col("last_seen") >= cutoff)["target"].to_numpy()] = True
        return cls.of_masks(counts, log_q, is_candidate, active)


    @classmethod
    def from_target_table(cls, table: pl.DataFrame, config: DataConfig) -> TargetStats:
        """The same statistics from the prepared dataset's targets.parquet (data/dataset.py),
        which counts every event, so a rank holding a share of the log still reads them whole
        (data/prepare.py then keeps its `target_rows` of the counts and log q)."""
        if not table["target"].is_sorted():  # as written here; another engine may not
            table = table.sort("target")
        counts = narrowest_counts(table["train_count"].to_numpy())
        log_q = sampling_log_q(counts, config)
        seen = (table["train_count"] + table["valid_count"] + table["test_count"]) > 0
        # A null (another engine's file) is not a candidate, nor in the pool, as a filter reads it.
        return cls.of_masks(
            counts, log_q, seen.fill_null(False).to_numpy(), table["active"].fill_null(False).to_numpy()
        )


def narrowest_counts(counts: np.ndarray) -> np.ndarray:
    """[T] counts as int32 when the largest fits (per-target arrays add up on every rank:
    40 MB at 1e7 targets, not 80), else int64."""
    if len(counts) and int(counts.max()) > np.iinfo(np.int32).max:
        return counts.astype(np.int64, copy=False)
    return counts.astype(np.int32, copy=False)


def sampling_log_q(counts: np.ndarray, config: DataConfig) -> np.ndarray:
    """[T] float32 log q(i), q(i) ∝ max(count, floor)^exponent, normalised (in float64)."""
    # In place, one [T] float array at a time: this runs on every rank, at 1e7 targets.
    log_q = np.maximum(counts.astype(np.float64), config.freq_count_floor)
    log_q **= config.freq_exponent
    total = log_q.sum()
    np.log(log_q, out=log_q)
    log_q -= np.log(total)
    return log_q.astype(np.float32)


def active_cutoff(timestamps: np.ndarray, config: DataConfig) -> int:
    if config.active_since_date is not None:
        try:
            day = dt.datetime.fromisoformat(config.active_since_date)
        except ValueError:
            raise ValueError(
                f"data.active_since_date: expected an ISO date like 2004-06-01, got {config.active_since_date!r}"
            ) from None
        if day.tzinfo is None:
            day = day.replace(tzinfo=dt.timezone.utc)
        return int(day.timestamp())
    low, high = int(timestamps.min()), int(timestamps.max())
    return low + int(config.active_since_fraction * (high - low))
