"""The ID tables, as one TorchRec `EmbeddingCollection` that DistributedModelParallel
can shard later (row-wise for the big ID tables).

Tables and the features that look them up:

    table          rows                 features
    target_ids     targets (or all IDs) history_target, candidate_target, contact_target
                                        (+ actor when shared)
    actor_ids      actors               actor                (only when not shared)
    action_types   action types         history_action, next_action

Example of the lookup KJT for two examples, one random negative each:

    feature            i = 0        i = 1      <-- batch index
    history_target     [7, 3, 9]    [4]
    history_action     [0, 1, 0]    [2]
    actor              [12]         [5]
    next_action        [1]          [0]
    candidate_target   [8, 33]      [2, 17]     (positive first, then random negatives)
    contact_target     [7, 3, 9, 5] [4]         (distinct contacts: history targets, senders of
                                                 incoming events; for the repeat re-scorer)
    candidate_feature  [f, f, f]    [f]         (feature tokens of each example's candidates)
    history_feature    [f, f]       []          (feature tokens of each example's history)

The feature tables exist only when the log comes with sparse target features.

NOTE: built unsharded; pass `device=torch.device("meta")` to build it for sharding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, JaggedTensor, KeyedJaggedTensor

from configs.names import (
    ACTION_TABLE, ACTOR, ACTOR_TABLE, CANDIDATE_FEATURE, CANDIDATE_TARGET, CONTACT_FEATURE, CONTACT_TARGET,
    FEATURE_TABLE, HISTORY_ACTION, HISTORY_FEATURE, HISTORY_TARGET, NEXT_ACTION, TARGET_TABLE,
)


@dataclass(frozen=True)
class VocabularySizes:
    num_targets: int
    num_actors: int
    num_actions: int
    shared_id_table: bool
    """Actors are looked up in the target table (same people, one ID space)."""
    num_feature_tokens: int = 0
    """Vocabulary of sparse target feature tokens (0: no feature table)."""

    @property
    def num_id_rows(self) -> int:
        return max(self.num_targets, self.num_actors) if self.shared_id_table else self.num_targets


def _normal_init(std: float):
    def init(weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return weight.normal_(0.0, std)

    return init


def table_configs(sizes: VocabularySizes, dim: int) -> list[EmbeddingConfig]:
    def table(name: str, rows: int, features: list[str]) -> EmbeddingConfig:
        return EmbeddingConfig(
            name=name, embedding_dim=dim, num_embeddings=rows, feature_names=features, init_fn=_normal_init(0.1)
        )

    target_features = [HISTORY_TARGET, CANDIDATE_TARGET, CONTACT_TARGET] + ([ACTOR] if sizes.shared_id_table else [])
    tables = [
        table(TARGET_TABLE, sizes.num_id_rows, target_features),
        table(ACTION_TABLE, sizes.num_actions, [HISTORY_ACTION, NEXT_ACTION]),
    ]
    if sizes.num_feature_tokens:
        tables.append(table(FEATURE_TABLE, sizes.num_feature_tokens, [CANDIDATE_FEATURE, HISTORY_FEATURE, CONTACT_FEATURE]))
    if not sizes.shared_id_table:
        tables.append(table(ACTOR_TABLE, sizes.num_actors, [ACTOR]))
    return tables


@dataclass
class TargetRows:
    """What the candidate tower reads for N targets: each target's ID row [N, D] and the
    mean of its sparse feature tokens' rows [N, D] (None without a feature table)."""

    target_ND: torch.Tensor
    feature_ND: torch.Tensor | None = None


@dataclass
class LookedUp:
    """The embeddings of one batch (B examples), each flat over its jagged layout, e.g.
    two examples with encoder windows of 3 and 1 events and C = 2 candidates each:

        history (N = 3 + 1 events, oldest first per example):
            target_ND / feature_ND / history_action_ND   rows [e00 e01 e02 | e10]
        candidates (B * C rows, example-major, the positive first):
            target_ND / feature_ND                       rows [c00 c01 | c10 c11]
        contacts (U distinct (example, contact) pairs, by example; None when not asked):
            target_ND / feature_ND                       rows [u00 u01 u02 u03 | u10]
        actor_BD, next_action_BD                         one row per example
    """

    actor_BD: torch.Tensor
    next_action_BD: torch.Tensor
    history: TargetRows
    history_action_ND: torch.Tensor
    candidates: TargetRows
    contacts: TargetRows | None


class IdEmbeddings(nn.Module):
    """The one owner of the embedding lookup: the `EmbeddingCollection`, each target's
    feature tokens (pooled to their mean per target), and the encoder's history window.
    `lookup_batch` sends every ID of a batch in one collection call and hands the towers
    plain tensors (`LookedUp`)."""

    def __init__(
        self,
        sizes: VocabularySizes,
        dim: int,
        max_len: int,
        device: torch.device | None = None,
        target_feature_offsets: torch.Tensor | None = None,
        target_feature_tokens: torch.Tensor | None = None,
    ) -> None:
        """`max_len`: the encoder's window (each row's last `max_len` history events).
        `target_feature_offsets` [T + 1] / `target_feature_tokens` [M]: each target's sparse
        feature tokens (jagged), when the log has them (`sizes.num_feature_tokens` > 0)."""
        super().__init__()
        self.sizes, self.dim, self.max_len = sizes, dim, max_len
        self.ec = EmbeddingCollection(tables=table_configs(sizes, dim), device=device)
        self.feature_names = [name for table in self.ec.embedding_configs() for name in table.feature_names]
        self.table_names = [table.name for table in self.ec.embedding_configs()]
        self.has_features = sizes.num_feature_tokens > 0
        if self.has_features:
            self.register_buffer("feature_offsets", target_feature_offsets.to(torch.int64), persistent=False)
            self.register_buffer("feature_tokens", target_feature_tokens.to(torch.int64), persistent=False)

    def table_weights(self) -> dict[str, torch.Tensor]:
        """{table name: its weight}, by the names the collection was built with: a plain
        tensor in one process, a ShardedTensor of this rank's shards once sharded (DMP
        keeps the collection's state-dict names)."""
        state = self.ec.state_dict()
        return {name: state[f"embeddings.{name}.weight"] for name in self.table_names}

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        return self.ec(features)

    def lookup(self, parts: dict[str, tuple[torch.Tensor, torch.Tensor]], stride: int) -> dict[str, torch.Tensor]:
        """{feature: (ids, lengths per example [stride])} -> {feature: embeddings [n, D]}.
        Features of the collection missing from `parts` are sent empty."""
        device = next(iter(parts.values()))[0].device
        empty = (torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(stride, dtype=torch.int64, device=device))
        ordered = [parts.get(name, empty) for name in self.feature_names]
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=self.feature_names,
            values=torch.cat([values for values, _ in ordered]),
            lengths=torch.cat([lengths for _, lengths in ordered]),
        )
        return {name: jagged.values() for name, jagged in self.ec(features).items() if name in parts}

    def encoder_window(self, history: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Each row's last `max_len` events: batches may carry more for the repeat
        re-scorer, which only counts them (cheap); the encoder attends over them (not cheap)."""
        lengths = history[HISTORY_TARGET].lengths()
        if lengths.numel() == 0 or int(lengths.max()) <= self.max_len:
            return history
        kept = lengths.clamp(max=self.max_len)
        row = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
        end = torch.cumsum(lengths, 0)
        keep = torch.arange(row.numel(), device=lengths.device) >= (end - kept)[row]
        keys = history.keys()
        return KeyedJaggedTensor.from_lengths_sync(
            keys=keys,
            values=torch.cat([history[key].values()[keep] for key in keys]),
            lengths=kept.repeat(len(keys)),
        )

    def lookup_batch(
        self,
        actor_B: torch.Tensor,
        next_action_B: torch.Tensor,
        encoder_history: KeyedJaggedTensor,
        candidates_BC: torch.Tensor,
        contacts: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> LookedUp:
        """One collection call for every ID of a batch: the encoder window
        (`encoder_window`'s output), the candidates [B, C] and, when given, the contacts
        (target [U], example [U], sorted by example)."""
        batch = actor_B.shape[0]
        history_target = encoder_history[HISTORY_TARGET]
        history_lengths = history_target.lengths()
        ones = torch.ones_like(actor_B)
        per_candidate_row = torch.full_like(actor_B, candidates_BC.shape[1])
        parts = {
            HISTORY_TARGET: (history_target.values(), history_lengths),
            HISTORY_ACTION: (encoder_history[HISTORY_ACTION].values(), history_lengths),
            ACTOR: (actor_B, ones),
            NEXT_ACTION: (next_action_B, ones),
            CANDIDATE_TARGET: (candidates_BC.reshape(-1), per_candidate_row),
        }
        feature_sources = [
            (CANDIDATE_FEATURE, candidates_BC.reshape(-1), per_candidate_row),
            (HISTORY_FEATURE, history_target.values(), history_lengths),
        ]
        if contacts is not None:
            contact_U, row_U = contacts
            per_row = torch.bincount(row_U, minlength=batch)
            parts[CONTACT_TARGET] = (contact_U, per_row)
            feature_sources.append((CONTACT_FEATURE, contact_U, per_row))
        counts = {}
        if self.has_features:
            for key, ids, per_example in feature_sources:
                tokens, token_lengths, counts[key] = self._feature_part(ids, per_example)
                parts[key] = (tokens, token_lengths)
        looked_up = self.lookup(parts, batch)
        pooled = {key: _mean_per_id(looked_up[key], counts[key]) for key in counts}

        def rows(target_key: str, feature_key: str) -> TargetRows:
            return TargetRows(looked_up[target_key], pooled.get(feature_key))

        return LookedUp(
            actor_BD=looked_up[ACTOR],
            next_action_BD=looked_up[NEXT_ACTION],
            history=rows(HISTORY_TARGET, HISTORY_FEATURE),
            history_action_ND=looked_up[HISTORY_ACTION],
            candidates=rows(CANDIDATE_TARGET, CANDIDATE_FEATURE),
            contacts=rows(CONTACT_TARGET, CONTACT_FEATURE) if contacts is not None else None,
        )

    def lookup_targets(self, ids_N: torch.Tensor) -> TargetRows:
        """[N] target IDs -> what the candidate tower reads for them."""
        one_example = torch.full((1,), ids_N.shape[0], dtype=torch.int64, device=ids_N.device)
        parts = {CANDIDATE_TARGET: (ids_N, one_example)}
        counts = None
        if self.has_features:
            tokens, token_lengths, counts = self._feature_part(ids_N, one_example)
            parts[CANDIDATE_FEATURE] = (tokens, token_lengths)
        looked_up = self.lookup(parts, 1)
        features = _mean_per_id(looked_up[CANDIDATE_FEATURE], counts) if counts is not None else None
        return TargetRows(looked_up[CANDIDATE_TARGET], features)

    def _feature_part(
        self, ids: torch.Tensor, per_example: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The feature tokens of `ids` (jagged by example, `per_example` IDs each) as one
        part of the lookup: (tokens [M], tokens per example [B], tokens per ID [N])."""
        tokens, counts = self._features_of(ids)
        batch = per_example.shape[0]
        example_of_id = torch.repeat_interleave(torch.arange(batch, device=ids.device), per_example)
        token_lengths = torch.zeros(batch, dtype=torch.int64, device=ids.device).index_add_(0, example_of_id, counts)
        return tokens, token_lengths, counts

    def _features_of(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature tokens of each target ID, jagged: (tokens [M], counts per ID [N])."""
        starts = self.feature_offsets[ids]
        counts = self.feature_offsets[ids + 1] - starts
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        flat = torch.arange(int(counts.sum()), device=ids.device) - first + torch.repeat_interleave(starts, counts)
        return self.feature_tokens[flat], counts


def _mean_per_id(token_embeddings_MD: torch.Tensor, counts_N: torch.Tensor) -> torch.Tensor:
    """Mean of each ID's token embeddings (zeros for an ID without tokens). [N, D]."""
    owner_M = torch.repeat_interleave(torch.arange(counts_N.shape[0], device=counts_N.device), counts_N)
    summed = torch.zeros(counts_N.shape[0], token_embeddings_MD.shape[1], device=token_embeddings_MD.device)
    summed = summed.index_add(0, owner_M, token_embeddings_MD)
    return summed / counts_N.clamp(min=1)[:, None].to(summed.dtype)
