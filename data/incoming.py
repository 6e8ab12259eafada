"""Incoming events: who contacted a person, and when (logs where actors and targets are
the same people, e.g. messaging or trust).

In a messaging log the strongest predictor of whom a person writes next, after the
people they already write to, is the people who just wrote to them: measured on
CollegeMsg's test split, 21% of test targets had messaged the actor before and never
been messaged by it, and a recency-frequency ranking that also counts such incoming
events rises from NDCG@10 0.452 to 0.605. An actor's own sequence cannot show this.

Layout, jagged by receiver (the person contacted, in the shared ID space):

    events reaching person p = offsets[p] .. offsets[p+1]-1, sorted by (timestamp, order)
    sources    = [s s s   s   s s]      who sent each event
    timestamps = [t t t   t   t t]

Only *known* events go in: for the benchmark's validation queries the training events,
for its test queries training and validation events (the events a held-out split keeps
back are never read as features), and every event for inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.sequences import Sequences


@dataclass(frozen=True)
class Incoming:
    offsets: np.ndarray  # [P + 1] int64
    sources: np.ndarray  # [M] int64 sender of each event (an index in the shared ID space)
    timestamps: np.ndarray  # [M] int64
    _keys: np.ndarray  # [M] receiver * (K + 1) + rank of the timestamp among the K distinct ones: sorted
    _distinct_times: np.ndarray  # [K] sorted distinct timestamps

    @classmethod
    def from_sequences(cls, seqs: Sequences, known: np.ndarray | None = None) -> Incoming:
        """`known`: [N] bool over the flat events of `seqs`, the events that may be read
        (all when None). Needs a shared ID space: a sender is an actor index, which must be
        the same person's target index."""
        sender = np.repeat(seqs.actor, seqs.lengths)
        receiver, timestamps = seqs.targets, seqs.timestamps
        if known is not None:
            sender, receiver, timestamps = sender[known], receiver[known], timestamps[known]
        # Stable: equal (receiver, timestamp) keep the actor-sorted flat order.
        order = np.lexsort((timestamps, receiver))
        return cls.from_events(receiver[order], sender[order], timestamps[order], max(seqs.num_targets, seqs.num_actors))

    @classmethod
    def from_events(
        cls, receivers: np.ndarray, senders: np.ndarray, timestamps: np.ndarray, num_people: int
    ) -> Incoming:
        """From events already sorted by (receiver, timestamp), ties in the senders' event
        order (actor, then row): the order of the prepared dataset's incoming partitions,
        and the one `from_sequences` sorts into."""
        receiver, sender = np.asarray(receivers, dtype=np.int64), np.asarray(senders, dtype=np.int64)
        timestamps = np.asarray(timestamps, dtype=np.int64)
        offsets = np.zeros(num_people + 1, dtype=np.int64)
        np.cumsum(np.bincount(receiver, minlength=num_people), out=offsets[1:])
        distinct, rank = np.unique(timestamps, return_inverse=True)
        # Within a receiver's segment the timestamps are sorted, so one binary search on
        # this key finds where "strictly before t" ends for any (receiver, t).
        keys = receiver.astype(np.int64) * (len(distinct) + 1) + rank.reshape(-1)
        return cls(
            offsets=offsets,
            sources=sender.astype(np.int64),
            timestamps=timestamps.astype(np.int64),
            _keys=keys,
            _distinct_times=distinct,
        )

    @property
    def num_people(self) -> int:
        return len(self.offsets) - 1

    def window(self, receivers: np.ndarray, before: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """For each query (receiver r, time t): the last `max_len` events that reached r
        strictly before t. Returns (flat indices into `sources` / `timestamps`, lengths)."""
        receivers = np.asarray(receivers, dtype=np.int64)
        first_not_before = np.searchsorted(self._distinct_times, before, side="left")
        stride = len(self._distinct_times) + 1
        end = np.searchsorted(self._keys, receivers * stride + first_not_before, side="left")
        start = np.maximum(self.offsets[receivers], end - max_len)
        lengths = end - start
        flat = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths) + np.repeat(start, lengths)
        return flat.astype(np.int64), lengths.astype(np.int64)
