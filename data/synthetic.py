"""Synthetic interaction logs for scale tests, shaped like the real ones.

What the public logs show and this generator reproduces (all vectorised in numpy,
so 1e7 events over a 1e7-ID vocabulary take seconds):

- heavy-tailed actor activity and target popularity (power laws: a few actors
  send most events, a few targets receive most of them);
- repeat contact: most events go back to someone the actor already contacted,
  usually a recent one (a geometric number of steps back);
- bursts in time: short gaps inside sessions, long gaps between them.

Usage:
    python -m data.synthetic --events 1e7 --actors 1e6 --targets 1e7 --out synthetic.parquet

or, with no file at all, as a config's data source (generated in memory, identically on
every rank, from the seed):

    data.path: "synthetic:events=2e7,actors=1e6,targets=1e7,cover_targets=true"
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl


@dataclass(kw_only=True)
class SyntheticLogSpec:
    num_events: int
    num_actors: int
    num_targets: int
    num_actions: int = 3
    shared_id_space: bool = False
    """Actors and targets are the same people (IDs drawn from one space of
    max(num_actors, num_targets) IDs), as in messaging logs."""
    repeat_prob: float = 0.6
    """Chance that an event (after the actor's first) repeats an earlier target."""
    repeat_recency: float = 0.4
    """Repeats go k events back with k ~ Geometric(repeat_recency): larger = more recent."""
    activity_skew: float = 2.0
    """Power-law skew of actor activity (1 = uniform; larger = heavier head)."""
    popularity_skew: float = 2.5
    """Power-law skew of target popularity."""
    burst_prob: float = 0.7
    """Chance that the gap to an actor's next event is a short in-session gap."""
    start_time: int = 1_600_000_000
    cover_targets: bool = False
    """Every one of the `num_targets` IDs is the target of at least one event (needs
    num_events >= num_targets), so the ID table has exactly `num_targets` rows: for
    scale runs that must size the table, not just the log."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_events", "num_actors", "num_targets", "num_actions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.cover_targets and self.shared_id_space:
            raise ValueError("cover_targets: only for separate actor and target IDs (shared_id_space false)")
        if self.cover_targets and self.num_events < self.num_targets:
            raise ValueError(
                f"cover_targets needs num_events >= num_targets, got {self.num_events:,} < {self.num_targets:,}"
            )


def _power_law_ids(rng: np.random.Generator, n: int, size: int, skew: float) -> np.ndarray:
    """Indices in [0, n) with P(index < x) = (x / n) ** (1 / skew): a power-law head at 0."""
    return np.minimum((n * rng.random(size) ** skew).astype(np.int64), n - 1)


def generate(spec: SyntheticLogSpec) -> pl.DataFrame:
    """A log of `spec.num_events` events, in time order: actor, target, action, timestamp."""
    rng = np.random.default_rng(spec.seed)
    n = spec.num_events
    id_space = max(spec.num_actors, spec.num_targets) if spec.shared_id_space else spec.num_targets

    # Who acts: power-law activity; a random relabelling so IDs carry no popularity order.
    actor_label = rng.permutation(spec.num_actors)
    actor = np.sort(actor_label[_power_law_ids(rng, spec.num_actors, n, spec.activity_skew)])

    # Position of every event inside its actor's sequence (events are grouped by actor).
    first = np.r_[True, actor[1:] != actor[:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    position = np.arange(n) - group_start

    # Fresh targets by popularity; repeats point k >= 1 events back in the same sequence.
    target_label = rng.permutation(id_space)
    fresh = target_label[_power_law_ids(rng, id_space, n, spec.popularity_skew)]
    covering = np.zeros(n, dtype=bool)
    if spec.cover_targets:
        # Fresh draws at random positions take every ID once (and are never repeats);
        # the rest stay power-law.
        cover_at = rng.choice(n, size=spec.num_targets, replace=False)
        fresh[cover_at] = rng.permutation(spec.num_targets)
        covering[cover_at] = True
    back = rng.geometric(spec.repeat_recency, size=n)
    repeats = (rng.random(n) < spec.repeat_prob) & (position >= 1)
    repeats &= ~covering
    source = np.where(repeats, np.arange(n) - np.minimum(back, position), np.arange(n))
    # Resolve chains (a repeat of a repeat) by pointer jumping: O(log chain length) passes.
    while True:
        jumped = source[source]
        if np.array_equal(jumped, source):
            break
        source = jumped
    target = fresh[source]
    if spec.shared_id_space:
        target = np.where(target == actor, (target + 1) % id_space, target)  # nobody messages themself

    # Bursty time: short in-session gaps, long gaps between sessions, per actor.
    gap = np.where(
        rng.random(n) < spec.burst_prob, rng.exponential(300.0, size=n), rng.exponential(3 * 86400.0, size=n)
    ).astype(np.int64)
    gap[first] = rng.integers(0, 180 * 86400, size=int(first.sum()))  # when the actor joins
    clock = np.cumsum(gap)
    timestamp = spec.start_time + clock - (clock[group_start] - gap[group_start])

    action = _power_law_ids(rng, spec.num_actions, n, 1.5).astype(np.int32)
    order = np.argsort(timestamp, kind="stable")
    return pl.DataFrame(
        {"actor": actor[order], "target": target[order], "action": action[order], "timestamp": timestamp[order]}
    )


SPEC_KEYS = {
    "events": "num_events", "actors": "num_actors", "targets": "num_targets", "actions": "num_actions",
    "shared_ids": "shared_id_space", "cover_targets": "cover_targets", "repeat_prob": "repeat_prob",
    "seed": "seed",
}
_FLAGS = ("shared_id_space", "cover_targets")


def _spec_value(field_name: str, value: str) -> bool | float | int:
    """One spec value, typed as its field; ValueError when it is not."""
    if field_name in _FLAGS:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError
        return value.lower() in ("true", "1")
    if field_name == "repeat_prob":
        return float(value)
    number = float(value)  # counts as 2e7 or 20_000_000
    if number != int(number):
        raise ValueError
    return int(number)


def parse_spec(text: str) -> SyntheticLogSpec:
    """`events=2e7,actors=1e6,targets=1e7[,actions=3,shared_ids=false,cover_targets=true,
    repeat_prob=0.6,seed=0]` -> a spec; counts accept `2e7` and `20_000_000`."""
    values: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in SPEC_KEYS:
            raise ValueError(f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(SPEC_KEYS)}")
        field_name = SPEC_KEYS[key]
        try:
            values[field_name] = _spec_value(field_name, value)
        except ValueError:
            expected = "true or false" if field_name in _FLAGS else "a number"
            raise ValueError(f"{key}={value!r}: expected {expected}") from None
    missing = [key for key in ("events", "actors", "targets") if SPEC_KEYS[key] not in values]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (e.g. events=1e6,actors=1e5,targets=1e6)")
    return SyntheticLogSpec(**values)


def write_log(frame: pl.DataFrame, path: str | Path) -> Path:
    """Write as parquet (`.parquet`) or as a SNAP-style text edge list (anything else)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        frame.write_parquet(path)
    else:
        frame.select("actor", "target", "timestamp").write_csv(path, separator=" ", include_header=False)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=float, default=1e6)
    parser.add_argument("--actors", type=float, default=1e5)
    parser.add_argument("--targets", type=float, default=1e6)
    parser.add_argument("--actions", type=int, default=3)
    parser.add_argument("--shared-ids", action="store_true", help="actors and targets share one ID space")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help=".parquet, or any other name for SNAP text")
    args = parser.parse_args(argv)
    spec = SyntheticLogSpec(
        num_events=int(args.events),
        num_actors=int(args.actors),
        num_targets=int(args.targets),
        num_actions=args.actions,
        shared_id_space=args.shared_ids,
        seed=args.seed,
    )
    path = write_log(generate(spec), args.out)
    print(f"wrote {spec.num_events:,} events to {path}")


if __name__ == "__main__":
    main()
