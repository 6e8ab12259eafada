"""The two towers. Both end L2-normalised, so their dot product is a cosine similarity.

- `QueryTower`: actor + next action (+ when it happens) + history -> one vector, and the
  same for every history position (for temporal pretraining).
- `CandidateTower`: target ID embedding (+ sparse target features) -> item MLP -> vector.

Shape suffixes: B batch, L history positions, D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from configs.schema import ModelConfig
from models.hstu import HSTUEncoder
from models.layers import MLP, NUM_CYCLIC_FEATURES, cyclic_time_features
from models.transformer import TransformerEncoder


@dataclass
class QueryInputs:
    """Dense, left-padded query-side inputs (valid history entries at the end of each row)."""

    history_target_BLD: torch.Tensor
    history_action_BLD: torch.Tensor
    history_timestamp_BL: torch.Tensor
    mask_BL: torch.Tensor
    actor_BD: torch.Tensor
    next_action_BD: torch.Tensor
    next_timestamp_B: torch.Tensor


@dataclass
class QueryOutput:
    query_BD: torch.Tensor
    """The query vector (unit norm)."""
    positions_BLD: torch.Tensor | None
    """Unit-norm query vector of every history position j, predicting the event after j
    (None unless asked for). Entry L-1 equals `query_BD` when the row has history."""


class QueryTower(nn.Module):
    def __init__(self, config: ModelConfig, max_len: int) -> None:
        super().__init__()
        dim = config.embedding_dim
        self.encoder_kind = config.encoder
        if config.encoder == "hstu":
            self.hstu = HSTUEncoder(
                dim,
                max_len,
                config.num_layers,
                config.num_heads,
                config.dropout,
                film=config.film,
                time_features=config.time_features,
                relative_attention_bias=config.relative_attention_bias,
                num_time_buckets=config.num_time_buckets,
            )
            self.head = MLP(dim, 2 * dim, dim, config.activation)
        else:
            self.transformer = TransformerEncoder(
                dim,
                max_len,
                config.num_layers,
                config.num_heads,
                config.dropout,
                activation=config.activation,
                causal=config.causal,
                pooling=config.pooling,
                time_features=config.time_features,
            )
            # 2D -> D: a small MLP with GELU (or a single linear map when turned off).
            self.projection = MLP(2 * dim, 2 * dim, dim, "gelu") if config.history_projection else nn.Linear(2 * dim, dim)
            self.next_time = nn.Linear(NUM_CYCLIC_FEATURES, dim) if config.time_features else None
            self.combine = MLP(3 * dim, 2 * dim, dim, config.activation)

    def forward(self, inputs: QueryInputs, all_positions: bool = False) -> QueryOutput:
        # The heads run only where a vector is wanted (every real position, or the query's),
        # so their cost follows real tokens; the rest of [B, L, D] stays zero.
        index = _real_positions(inputs.mask_BL) if all_positions else _query_positions(inputs.mask_BL)
        if self.encoder_kind == "hstu":
            encoded_BLD = self.hstu(
                inputs.history_target_BLD,
                inputs.history_action_BLD,
                inputs.history_timestamp_BL,
                inputs.mask_BL,
                inputs.actor_BD,
                inputs.next_action_BD,
                inputs.next_timestamp_B,
            )
            vectors_ND = F.normalize(self.head(encoded_BLD[index]), dim=-1)
        else:
            vectors_ND = self._transformer_vectors(inputs, index)
        if not all_positions:
            return QueryOutput(query_BD=vectors_ND, positions_BLD=None)
        vectors_BLD = vectors_ND.new_zeros(inputs.mask_BL.shape + (vectors_ND.shape[-1],)).index_put(index, vectors_ND)
        return QueryOutput(query_BD=vectors_BLD[:, -1], positions_BLD=vectors_BLD)

    def _transformer_vectors(self, inputs: QueryInputs, index: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        pooled_BLW = self.transformer(
            inputs.history_target_BLD, inputs.history_action_BLD, inputs.history_timestamp_BL, inputs.mask_BL
        )
        rows_N = index[0]
        # An empty history contributes nothing (its pooled entries are padding).
        has_history_N1 = inputs.mask_BL.any(dim=1)[rows_N, None]
        history_ND = self.projection(torch.where(has_history_N1, pooled_BLW[index], 0.0))
        # The event after position j: its action and time (the query's for the last entry).
        next_action_BLD = torch.cat([inputs.history_action_BLD[:, 1:], inputs.next_action_BD[:, None]], dim=1)
        next_time_BL = torch.cat([inputs.history_timestamp_BL[:, 1:], inputs.next_timestamp_B[:, None]], dim=1)
        next_ND = next_action_BLD[index]
        if self.next_time is not None:
            next_ND = next_ND + self.next_time(cyclic_time_features(next_time_BL[index]))
        actor_ND = inputs.actor_BD[rows_N]
        return F.normalize(self.combine(torch.cat([history_ND, actor_ND, next_ND], dim=-1)), dim=-1)


def _real_positions(mask_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of every history position and of each row's query position (the
    last column, real even for an empty history), in row-major order."""
    real_BL = mask_BL.clone()
    real_BL[:, -1] = True
    return real_BL.nonzero(as_tuple=True)


def _query_positions(mask_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(mask_BL.shape[0], device=mask_BL.device)
    return rows, torch.full_like(rows, mask_BL.shape[1] - 1)


class CandidateTower(nn.Module):
    """Target embedding (+ sparse feature embeddings, summed) -> residual item MLP -> unit vector."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim = config.embedding_dim
        self.mlp = MLP(dim, 2 * dim, dim, config.activation)

    def forward(self, target_ND: torch.Tensor, features_ND: torch.Tensor | None = None) -> torch.Tensor:
        x_ND = target_ND if features_ND is None else target_ND + features_ND
        return F.normalize(x_ND + self.mlp(x_ND), dim=-1)
