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


class IdEmbeddings(nn.Module):
    """All ID lookups of a batch in one call of the `EmbeddingCollection`."""

    def __init__(self, sizes: VocabularySizes, dim: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.sizes, self.dim = sizes, dim
        self.ec = EmbeddingCollection(tables=table_configs(sizes, dim), device=device)
        self.feature_names = [name for table in self.ec.embedding_configs() for name in table.feature_names]
        self.table_names = [table.name for table in self.ec.embedding_configs()]

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
