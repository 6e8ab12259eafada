"""Repeat-aware re-scoring: a learned bonus for the actor's contacts.

Repeat contact is the strongest signal in social logs (the recency-frequency baseline
lives on it), and a single query vector cannot put every recent contact on top while
still ranking new people. So the score of a candidate c for query x is

    score(x, c) = cos(q(x), c) / tau + bonus(x, c),   bonus = 0 unless c is a contact of x

A contact is a target of the actor's own history or, in a shared ID space (messaging,
trust), someone whose event reached the actor before the query's time (data/incoming.py):
people write back. The bonus is an MLP over features of (x, c) from both sources: how
often and how recently (in events and in hours), decayed counts at several half-lives,
plus the similarity and the next action type. With `merged_stream` the same features are
also computed over both sources merged in time order: what the two-way recency-frequency
rule reads (on CollegeMsg the newest contact of either direction is the next target of
over 40% of test queries: bench/contact_split.py), which per-source features can only
approximate through hours. Retrieval stays a dot product an index can serve; the bonus
re-scores at most `repeat_window` + `incoming_window` contacts per query. It is trained
in the same softmax, with the contacts as extra negatives (included with certainty, so
their log q is 0). On logs without repeats (ratings) it learns a negative bonus instead,
i.e. not to recommend what the actor already had.

With `model.repeat_explore` (RepeatNet's repeat / explore split) a contact's score is
instead (order(x, c) + propensity(x)) / tau, its cosine dropped: `order` is the MLP above,
trained only by a softmax over the row's contacts (on rows whose target is one of them),
and the main loss sees it detached; `propensity`, one number per query from the next
action, the idle time and the row's counts, is what the main loss trains, i.e. how much
any contact is worth against a new candidate. The order among contacts then no longer
competes with the balance against everyone else for the same gradient. The order's loss
leaves the towers and the actor and target tables alone (the cosine enters it detached)
but does train the next action's embedding: the action projection the propensity shares
and the action-type table (as measured; detaching those is untried).

Shape suffixes: B batch, N flat contact events, U distinct (row, target) pairs,
H padded pairs per row, F features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from data.activity import ACTIVITY_FEATURES

HALF_LIVES = (1.0, 4.0, 16.0, 64.0)
FEATURES_PER_SOURCE = 6 + len(HALF_LIVES)
QUERY_FEATURES = 4
"""Per-row features of the contact propensity (`model.repeat_explore`): the idle time and
log1p of the row's number of contacts, own events and incoming events."""


def num_repeat_features(merged_stream: bool, actor_idle: bool = False, activity: bool = False) -> int:
    """Features of a pair: the same set from the actor's own history ("outgoing"), from
    the events that reached the actor ("incoming", zeros and a 0 flag when absent) and,
    with `merged_stream`, from both merged in time order (the outgoing stream alone when
    there are no incoming events); with `actor_idle`, one more: the row's idle time; with
    `activity`, the contact's own recent activity with anyone (data/activity.py)."""
    return (3 if merged_stream else 2) * FEATURES_PER_SOURCE + int(actor_idle) + activity * ACTIVITY_FEATURES

# The offsets `model.contact_offset_on_validation` tries (logits, added to every contact's
# score), in this order: a tie on validation keeps the one tried first, the smaller
# change. On CollegeMsg validation stopped changing beyond +2 (+4 and +100 scored the
# same: by then every contact that can rise is above the other candidates).
CONTACT_OFFSETS = (0.0, 1.0, -1.0, 2.0, -2.0, 4.0, -4.0)

_NEVER_HOURS = 1e6
"""Time since the last contact for a pair with none from one source: far older than any."""


@dataclass
class HistoryItems:
    """The distinct (row, target) pairs of a batch's contacts -- its histories' targets and,
    in a shared ID space, the senders of its incoming events -- sorted by key = row * V + target."""

    key_U: torch.Tensor
    row_U: torch.Tensor
    target_U: torch.Tensor
    features_UF: torch.Tensor
    num_targets: int
    batch_size: int
    query_features_BQ: torch.Tensor | None = None
    """[B, QUERY_FEATURES] per row, whatever its contacts: what the contact propensity reads
    (`history_items(..., query_features=True)`; None otherwise)."""

    def find(self, rows: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pair index, found) for each (row, target); index is clamped where not found."""
        key = rows * self.num_targets + targets
        if self.key_U.numel() == 0:
            return torch.zeros_like(key), torch.zeros_like(key, dtype=torch.bool)
        index = torch.searchsorted(self.key_U, key).clamp(max=self.key_U.numel() - 1)
        return index, self.key_U[index] == key

    def contains(self, ids_BN: torch.Tensor) -> torch.Tensor:
        """[B, N] ids (row b's candidates) -> [B, N] bool: is the id one of row b's contacts."""
        rows = torch.arange(ids_BN.shape[0], device=ids_BN.device)[:, None].expand_as(ids_BN)
        return self.find(rows, ids_BN)[1]

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row, its distinct contacts as columns: (ids [B, H], pair index [B, H],
        valid [B, H])."""
        counts_B = torch.bincount(self.row_U, minlength=self.batch_size)
        width = int(counts_B.max().item()) if self.batch_size else 0
        first_B = torch.cumsum(counts_B, 0) - counts_B
        column_U = torch.arange(self.row_U.numel(), device=self.row_U.device) - first_B[self.row_U]
        ids_BH = torch.zeros((self.batch_size, width), dtype=torch.int64, device=self.row_U.device)
        index_BH = torch.zeros_like(ids_BH)
        valid_BH = torch.zeros((self.batch_size, width), dtype=torch.bool, device=self.row_U.device)
        ids_BH[self.row_U, column_U] = self.target_U
        index_BH[self.row_U, column_U] = torch.arange(self.row_U.numel(), device=self.row_U.device)
        valid_BH[self.row_U, column_U] = True
        return ids_BH, index_BH, valid_BH


@dataclass
class ContactEvents:
    """One source of contacts, jagged per row, oldest first: who and when."""

    target_N: torch.Tensor
    timestamp_N: torch.Tensor
    lengths_B: torch.Tensor


def history_items(
    history: ContactEvents,
    query_timestamp_B: torch.Tensor,
    num_targets: int,
    incoming: ContactEvents | None = None,
    merged_stream: bool = False,
    actor_idle: bool = False,
    query_features: bool = False,
    activity_UF: torch.Tensor | None = None,
) -> HistoryItems:
    """Group each row's contacts by target and compute the repeat features of each pair
    (`num_repeat_features(merged_stream, actor_idle)` of them).

    `actor_idle` adds the row's idle time, hours from its newest contact event of either
    source to the query's time, to every pair of the row. It is a feature of the query,
    not the pair: the MLP scores each pair on its own and cannot otherwise tell an actor
    mid-conversation (where the newest contact is the likely next one) from one returning
    after a day (where the frequent ones are). bench/contact_ceiling.py measured it.

    `query_features` adds `query_features_BQ`, what the contact propensity reads
    (`model.repeat_explore`); computed only then, as every training step builds these.

    `activity_UF` [U, ACTIVITY_FEATURES]: each pair's contact's own recent activity, in
    the pairs' order (`contact_keys`), appended last (`Batch.contact_activity`)."""
    batch = history.lengths_B.shape[0]
    device = history.target_N.device
    sources, rows, keys = _sources_rows_keys(history, incoming, num_targets)
    key_U, inverse = torch.unique(keys, return_inverse=True)
    num_pairs = key_U.numel()
    if activity_UF is not None and activity_UF.shape != (num_pairs, ACTIVITY_FEATURES):
        raise ValueError(
            f"history_items: contact activity of shape {tuple(activity_UF.shape)} for {num_pairs} contact pairs; "
            f"expected ({num_pairs}, {ACTIVITY_FEATURES}), one row per pair in key order (contact_keys)"
        )
    row_U = key_U // num_targets
    features, offset = [], 0
    for source, row in zip(sources, rows):
        size = row.numel()
        features.append(
            _source_features(source, row, inverse[offset : offset + size], row_U, num_pairs, query_timestamp_B)
        )
        offset += size
    if incoming is None:
        features.append(torch.zeros(num_pairs, FEATURES_PER_SOURCE, device=device))
        if merged_stream:
            features.append(features[0])
    elif merged_stream:
        merged, row, pair = _merged(sources, rows, inverse)
        features.append(_source_features(merged, row, pair, row_U, num_pairs, query_timestamp_B))
    idle_B = _idle_hours(sources, rows, query_timestamp_B) if actor_idle or query_features else None
    if actor_idle:
        features.append(idle_B[row_U, None])
    if activity_UF is not None:
        features.append(activity_UF.to(torch.float32))
    query_features_BQ = None
    if query_features:
        num_contacts_B = torch.bincount(row_U, minlength=batch).to(torch.float32)
        own_B = history.lengths_B.to(torch.float32)
        incoming_B = incoming.lengths_B.to(torch.float32) if incoming is not None else torch.zeros_like(own_B)
        query_features_BQ = torch.stack(
            [idle_B, torch.log1p(num_contacts_B), torch.log1p(own_B), torch.log1p(incoming_B)], dim=-1
        )
    return HistoryItems(
        key_U=key_U,
        row_U=row_U,
        target_U=key_U - row_U * num_targets,
        features_UF=torch.cat(features, dim=-1),
        num_targets=num_targets,
        batch_size=batch,
        query_features_BQ=query_features_BQ,
    )


def contact_keys(history: ContactEvents, incoming: ContactEvents | None, num_targets: int) -> torch.Tensor:
    """[U] the sorted distinct keys row * num_targets + target of a batch's contact pairs:
    the order of `history_items`' pairs (what `Batch.contact_activity` is aligned to)."""
    return torch.unique(_sources_rows_keys(history, incoming, num_targets)[2])


def _sources_rows_keys(
    history: ContactEvents, incoming: ContactEvents | None, num_targets: int
) -> tuple[list[ContactEvents], list[torch.Tensor], torch.Tensor]:
    """The contact sources, each event's row per source, and every event's pair key."""
    sources = [history] + ([incoming] if incoming is not None else [])
    batch = history.lengths_B.shape[0]
    rows = [torch.repeat_interleave(torch.arange(batch, device=s.target_N.device), s.lengths_B) for s in sources]
    return sources, rows, torch.cat([row * num_targets + s.target_N for row, s in zip(rows, sources)])


def _merged(
    sources: list[ContactEvents], rows: list[torch.Tensor], pair_N: torch.Tensor
) -> tuple[ContactEvents, torch.Tensor, torch.Tensor]:
    """The sources' events as one stream per row in time order (an incoming event at the
    same second as an own one counts as the newer), with each event's row and pair index."""
    target_N = torch.cat([s.target_N for s in sources])
    timestamp_N = torch.cat([s.timestamp_N for s in sources])
    row_N = torch.cat(rows)
    # Two stable sorts: by time, then by row (keeps time order within a row).
    order = torch.sort(timestamp_N, stable=True).indices
    order = order[torch.sort(row_N[order], stable=True).indices]
    lengths_B = sum(s.lengths_B for s in sources)
    merged = ContactEvents(target_N[order], timestamp_N[order], lengths_B)
    return merged, row_N[order], pair_N[order]


def _idle_hours(
    sources: list[ContactEvents], rows: list[torch.Tensor], query_timestamp_B: torch.Tensor
) -> torch.Tensor:
    """[B] log1p(hours since the row's newest event of any source) / 5, the scale of the
    per-source hour features; a row without events reads 0 (it has no pairs to score)."""
    timestamp_N = torch.cat([s.timestamp_N for s in sources]).to(query_timestamp_B.dtype)
    newest_B = query_timestamp_B.scatter_reduce(0, torch.cat(rows), timestamp_N, "amax", include_self=False)
    return _scaled_hours(_hours_since(query_timestamp_B, newest_B))


def _hours_since(now: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """Hours from `then` to `now` (seconds), never negative."""
    return (now - then).clamp(min=0).to(torch.float32) / 3600.0


def _scaled_hours(hours: torch.Tensor) -> torch.Tensor:
    """Every hour feature's scale: log1p(hours) / 5 (about 0-3 over a century)."""
    return torch.log1p(hours) / 5.0


def _source_features(
    source: ContactEvents,
    row_N: torch.Tensor,
    pair_N: torch.Tensor,
    row_U: torch.Tensor,
    num_pairs: int,
    query_timestamp_B: torch.Tensor,
) -> torch.Tensor:
    """[U, FEATURES_PER_SOURCE]: how often and how recently each pair occurs in one source
    (in events and in hours), and decayed counts at several half-lives (in events).
    A pair absent from the source gets count 0, flag 0 and the 'older than all' fill."""
    device = source.target_N.device
    end_B = torch.cumsum(source.lengths_B, 0)
    age_N = (end_B[row_N] - 1 - torch.arange(row_N.numel(), device=device)).to(torch.float32)  # newer events

    def scatter_sum(values_N: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_pairs, device=device).index_add_(0, pair_N, values_N)

    count_U = scatter_sum(torch.ones_like(age_N))
    present_U = count_U > 0
    length_U = source.lengths_B[row_U].to(torch.float32)
    age_last_U = torch.full((num_pairs,), float("inf"), device=device).scatter_reduce_(0, pair_N, age_N, "amin")
    age_last_U = torch.where(present_U, age_last_U, length_U)
    time_last_U = torch.zeros(num_pairs, dtype=torch.int64, device=device).scatter_reduce_(
        0, pair_N, source.timestamp_N, "amax", include_self=False
    )
    hours_since_U = _hours_since(query_timestamp_B[row_U], time_last_U)
    hours_since_U = torch.where(present_U, hours_since_U, _NEVER_HOURS)
    features = [
        present_U.to(torch.float32),
        torch.log1p(count_U),
        torch.log1p(age_last_U),
        _scaled_hours(hours_since_U),
        (present_U & (age_last_U == 0)).to(torch.float32),
        count_U / length_U.clamp(min=1),
    ] + [scatter_sum(torch.pow(0.5, age_N / half_life)) for half_life in HALF_LIVES]
    return torch.stack(features, dim=-1)


class RepeatScorer(nn.Module):
    """bonus(x, c) = MLP(repeat features of (x, c), cos(q(x), c), next action of x), one
    scalar per pair, in cosine units.

    The similarity is an input so the re-scorer can decide how much of it to keep for a
    past target: a target's score is cos + bonus, and the bonus may cancel the cosine
    where count and recency say more (measured: with the similarity left as additive
    noise, the joint model ordered past targets worse than recency alone)."""

    def __init__(
        self, action_dim: int, hidden_dim: int = 32, merged_stream: bool = False, actor_idle: bool = False,
        contact_offset: bool = False, repeat_explore: bool = False, activity: bool = False,
    ) -> None:
        super().__init__()
        self.merged_stream, self.actor_idle, self.repeat_explore = merged_stream, actor_idle, repeat_explore
        self.activity = activity  # reads each contact's own recent activity (Batch.contact_activity)
        # With `contact_offset`, a logit added to every contact's score, chosen after
        # training (CONTACT_OFFSETS); 0 until then. A buffer, so checkpoints and the export
        # carry it and predict applies it.
        self.contact_offset: torch.Tensor | None
        if contact_offset:
            self.register_buffer("contact_offset", torch.zeros(()))
        else:
            self.contact_offset = None
        self.action = nn.Linear(action_dim, 8)
        self.mlp = nn.Sequential(
            nn.Linear(num_repeat_features(merged_stream, actor_idle, activity) + 1 + 8, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, 1),
        )
        # With `repeat_explore`, the query's propensity to write to a contact at all, from
        # the next action and the row's counts and idle time (created last, so the
        # parameters above are drawn as without it).
        self.propensity = (
            nn.Sequential(nn.Linear(QUERY_FEATURES + 8, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1))
            if repeat_explore
            else None
        )

    def forward(self, items: HistoryItems, cosine_U: torch.Tensor, next_action_BD: torch.Tensor) -> torch.Tensor:
        """[U] bonus per (row, target) pair (with `repeat_explore`: its order among the row's contacts)."""
        action_UA = self.action(next_action_BD)[items.row_U]
        return self.mlp(torch.cat([items.features_UF, cosine_U[:, None], action_UA], dim=-1)).squeeze(-1)

    def contact_propensity(self, items: HistoryItems, next_action_BD: torch.Tensor) -> torch.Tensor:
        """[B] (`repeat_explore` only) how much a contact of the row is worth against a
        new candidate, in cosine units: one number per query."""
        inputs_BI = torch.cat([items.query_features_BQ, self.action(next_action_BD)], dim=-1)
        return self.propensity(inputs_BI).squeeze(-1)
