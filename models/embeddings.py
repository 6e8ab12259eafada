"""The ID tables, as one TorchRec `EmbeddingCollection` that DistributedModelParallel
can shard later (row-wise for the big ID tables).

Tables and the features that look them up:

    table          rows                 features
    target_ids     targets (or all IDs) history_target, candidate_target (+ actor when shared)
    actor_ids      actors               actor                (only when not shared)
    action_types   action types         history_action, next_action

Example of the lookup KJT for two examples, one random negative each:

    feature            i = 0        i = 1      <-- batch index
    history_target     [7, 3, 9]    [4]
    history_action     [0, 1, 0]    [2]
    actor              [12]         [5]
    next_action        [1]          [0]
    candidate_target   [8, 33]      [2, 17]     (positive first, then random negatives)

NOTE: built unsharded; pass `device=torch.device("meta")` to build it for sharding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, JaggedTensor, KeyedJaggedTensor

HISTORY_TARGET = "history_target"
HISTORY_ACTION = "history_action"
ACTOR = "actor"
NEXT_ACTION = "next_action"
CANDIDATE_TARGET = "candidate_target"
LOOKUP_KEYS = (HISTORY_TARGET, HISTORY_ACTION, ACTOR, NEXT_ACTION, CANDIDATE_TARGET)


@dataclass(frozen=True)
class VocabularySizes:
    num_targets: int
    num_actors: int
    num_actions: int
    shared_id_table: bool
    """Actors are looked up in the target table (same people, one ID space)."""

    @property
    def num_id_rows(self) -> int:
        return max(self.num_targets, self.num_actors) if self.shared_id_table else self.num_targets


def _normal_init(std: float):
    def init(weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return weight.normal_(0.0, std)

    return init


def table_configs(sizes: VocabularySizes, dim: int) -> list[EmbeddingConfig]:
    target_features = [HISTORY_TARGET, CANDIDATE_TARGET] + ([ACTOR] if sizes.shared_id_table else [])
    tables = [
        EmbeddingConfig(
            name="target_ids",
            embedding_dim=dim,
            num_embeddings=sizes.num_id_rows,
            feature_names=target_features,
            init_fn=_normal_init(0.1),
        ),
        EmbeddingConfig(
            name="action_types",
            embedding_dim=dim,
            num_embeddings=sizes.num_actions,
            feature_names=[HISTORY_ACTION, NEXT_ACTION],
            init_fn=_normal_init(0.1),
        ),
    ]
    if not sizes.shared_id_table:
        tables.append(
            EmbeddingConfig(
                name="actor_ids",
                embedding_dim=dim,
                num_embeddings=sizes.num_actors,
                feature_names=[ACTOR],
                init_fn=_normal_init(0.1),
            )
        )
    return tables


class IdEmbeddings(nn.Module):
    """All ID lookups of a batch in one call of the `EmbeddingCollection`."""

    def __init__(self, sizes: VocabularySizes, dim: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.sizes, self.dim = sizes, dim
        self.ec = EmbeddingCollection(tables=table_configs(sizes, dim), device=device)

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        return self.ec(features)


def lookup_features(
    history_target: torch.Tensor,
    history_action: torch.Tensor,
    history_lengths: torch.Tensor,
    actor: torch.Tensor,
    next_action: torch.Tensor,
    candidate_target: torch.Tensor,
    candidate_lengths: torch.Tensor,
) -> KeyedJaggedTensor:
    """Pack one batch's IDs into the lookup KJT (keys `LOOKUP_KEYS`, see the module doc)."""
    ones = torch.ones_like(actor)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(LOOKUP_KEYS),
        values=torch.cat([history_target, history_action, actor, next_action, candidate_target]),
        lengths=torch.cat([history_lengths, history_lengths, ones, ones, candidate_lengths]),
    )
