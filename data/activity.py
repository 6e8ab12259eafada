"""Each person's own recent activity: when they last sent or received anything, from anyone.

In a messaging log a contact who is active right now (mid-conversation with someone) is
likelier to be written to than one silent for a week, and neither the actor's history
nor its incoming events show it: it lies in *other* people's events. bench/contact_ceiling.py
measured this input on CollegeMsg as the one that still moves a ranker over the actor's
contacts (+0.009 NDCG@10); in the model (`model.contact_activity`, on by default) it is
worth +0.0031 on CollegeMsg over 6 seeds and +0.006-0.008 on the people logs derived from
it, every seed (README, Quality and Ablation).

The index copies no event: each person's times are a run of an array the rank already
holds, sorted within the run, and a query is a binary search inside the run:

    sent      the person's own sequence (data/sequences.py), the known events its prefix
    received  the person's incoming events (data/incoming.py), those known already

    run of person p in a source = start[p] .. stop[p]-1, timestamps sorted

As for incoming events only *known* events count: training events for training and
validation queries, training and validation events for test queries, every event for
inference. A rank holds the people of its own partitions only (their own events are its
sequences, the events reaching them its incoming events); `ContactActivity` asks the
owner of each person across ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

ACTIVITY_FEATURES = 4
"""log1p of the hours since the person's newest event before the query's time (scaled
by 1/5, as the re-scorer's other hour features), and log1p of its event counts in the
hour before, the day before, and ever before."""

_HOUR, _DAY = 3600, 86400
_NEVER_HOURS = 1e6
"""Hours since the newest event of a person with none before the query: far older than any."""


@dataclass(frozen=True)
class TimeRuns:
    """One source of people's events: run r is `timestamps[start[r] : stop[r]]`, sorted,
    the events of person `owners[r]` (of person r when `owners` is None). The arrays are
    views of what the rank holds, but for `stop` where only a prefix of a run is known."""

    timestamps: np.ndarray  # [M] int64
    start: np.ndarray  # [R] int64
    stop: np.ndarray  # [R] int64
    owners: np.ndarray | None = None  # [R] int64, ascending: whose each run is

    def runs_of(self, people: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, stop) of each person's run; an empty one (0, 0) for a person without."""
        if self.owners is None:
            return self.start[people], self.stop[people]
        if len(self.owners) == 0:
            return np.zeros(len(people), dtype=np.int64), np.zeros(len(people), dtype=np.int64)
        run = np.minimum(np.searchsorted(self.owners, people), len(self.owners) - 1)
        found = self.owners[run] == people
        return np.where(found, self.start[run], 0), np.where(found, self.stop[run], 0)

    def end_before(self, start: np.ndarray, stop: np.ndarray, times: np.ndarray) -> np.ndarray:
        """[n] index of the first event of each run [start, stop) at or after each time: a
        binary search inside every run at once (log2 of the longest run passes)."""
        low, high = start.copy(), stop.copy()
        while True:
            searching = low < high
            if not searching.any():
                return low
            middle = (low + high) // 2
            # Where a search is over, `middle` may point past the array: read a valid index.
            before = self.timestamps[np.where(searching, middle, 0)] < times
            low = np.where(searching & before, middle + 1, low)
            high = np.where(searching & ~before, middle, high)


@dataclass(frozen=True)
class ActivityIndex:
    """Each person's known events, sent and received, by time: what `features` reads."""

    sources: tuple[TimeRuns, ...]
    num_people: int

    @classmethod
    def from_events(cls, people: np.ndarray, timestamps: np.ndarray, num_people: int) -> ActivityIndex:
        """From events listed with whose activity each is (`people` [M]: its sender, and
        again its receiver), in any order: sorted into one source (a copy)."""
        people = np.asarray(people, dtype=np.int64)
        timestamps = np.asarray(timestamps, dtype=np.int64)
        if len(people) and (people.min() < 0 or people.max() >= num_people):
            raise ValueError(f"ActivityIndex: people must lie in [0, {num_people}), got [{people.min()}, {people.max()}]")
        order = np.lexsort((timestamps, people))
        offsets = np.zeros(num_people + 1, dtype=np.int64)
        np.cumsum(np.bincount(people, minlength=num_people), out=offsets[1:])
        return cls((TimeRuns(timestamps[order], offsets[:-1], offsets[1:]),), num_people)

    def features(self, people: np.ndarray, times: np.ndarray) -> np.ndarray:
        """[n, ACTIVITY_FEATURES] float32 of each (person, query time): its events strictly
        before the time (an event at the query's second is not known yet)."""
        people = np.asarray(people, dtype=np.int64)
        times = np.asarray(times, dtype=np.int64)
        count, last_hour, last_day = (np.zeros(len(people), dtype=np.int64) for _ in range(3))
        newest = np.full(len(people), np.iinfo(np.int64).min)
        for source in self.sources:
            start, stop = source.runs_of(people)
            end = source.end_before(start, stop, times)
            count += end - start
            last_hour += end - source.end_before(start, stop, times - _HOUR)
            last_day += end - source.end_before(start, stop, times - _DAY)
            has = end > start
            newest[has] = np.maximum(newest[has], source.timestamps[end[has] - 1])
        hours = np.full(len(people), _NEVER_HOURS)
        seen = count > 0
        hours[seen] = np.maximum(times[seen] - newest[seen], 0) / _HOUR
        return np.stack(
            [np.log1p(hours) / 5.0, np.log1p(last_hour), np.log1p(last_day), np.log1p(count)], axis=-1
        ).astype(np.float32)


Gather = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ContactActivity:
    """The activity features of any person at any time, on any rank: a rank holds the
    index of the people it owns (`owns`), so each lookup gathers every rank's requests,
    each rank answers those of its own people (zeros elsewhere) and a sum over ranks gives
    every answer (exactly: one term is not zero), as `models.samplers.RowShare` reads log q.
    Collective on several ranks: every rank calls it at the same point of its step, with
    or without requests of its own."""

    index: ActivityIndex
    owns: Callable[[np.ndarray], np.ndarray] | None = None
    """people -> bool, which of them this rank answers for; None: every one (one process)."""
    rank: int = 0
    gather_varying_with_sizes: Gather | None = None
    sum: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, people: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """[n, ACTIVITY_FEATURES] float32 of each (person, query time), on `people`'s device."""
        requests = torch.stack([people.to(torch.int64), times.to(torch.int64)], dim=-1).cpu()
        if self.gather_varying_with_sizes is None:
            return torch.from_numpy(self._answer(requests.numpy())).to(people.device)
        everyone, sizes = self.gather_varying_with_sizes(requests)
        answers = torch.from_numpy(self._answer(everyone.cpu().numpy()))
        answers = self.sum(answers)
        offset = int(sizes[: self.rank].sum())
        return answers[offset : offset + len(people)].to(people.device)

    def _answer(self, requests: np.ndarray) -> np.ndarray:
        people, times = requests[:, 0], requests[:, 1]
        if self.owns is None:
            return self.index.features(people, times)
        answers = np.zeros((len(people), ACTIVITY_FEATURES), dtype=np.float32)
        mine = self.owns(people)
        answers[mine] = self.index.features(people[mine], times[mine])
        return answers
