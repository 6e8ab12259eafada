"""The two towers. Both end L2-normalised, so their dot product is a cosine similarity.

- `QueryTower`: actor + next action (+ when it happens) + history -> one vector, and the
  same for every history position (for temporal pretraining).
- `CandidateTower`: target ID embedding (+ sparse target features) -> item MLP -> vector.

Shape suffixes: B batch, P flat history positions (`JaggedHistory.positions`), W the
positions a head runs at, D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from configs.schema import ModelConfig
from models.hstu import HSTUEncoder
from models.layers import MLP, NUM_CYCLIC_FEATURES, cyclic_time_features
from models.length_groups import JaggedHistory
from models.transformer import TransformerEncoder


@dataclass
class QueryInputs:
    """Query-side inputs, the history jagged (each row's encoder window, oldest first)."""

    history: JaggedHistory
    actor_BD: torch.Tensor
    next_action_BD: torch.Tensor
    next_timestamp_B: torch.Tensor


@dataclass
class QueryOutput:
    query_BD: torch.Tensor
    """The query vector (unit norm)."""
    positions_PD: torch.Tensor | None
    """Unit-norm query vector of every history position, flat over `history.positions`
    (entry j of a row predicts the event after its event j; a row's last entry equals its
    `query_BD`), or None unless asked for."""


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
        # The heads run only where a vector is wanted (every position, or each row's query
        # position): there is no padding outside the encoders' length-group blocks.
        positions = inputs.history.positions
        wanted = torch.arange(positions.total, device=positions.lengths.device) if all_positions else positions.last()
        if self.encoder_kind == "hstu":
            encoded_PD = self.hstu(inputs.history, inputs.actor_BD, inputs.next_action_BD, inputs.next_timestamp_B)
            vectors_WD = F.normalize(self.head(encoded_PD[wanted]).float(), dim=-1)
        else:
            vectors_WD = self._transformer_vectors(inputs, wanted)
        if not all_positions:
            return QueryOutput(query_BD=vectors_WD, positions_PD=None)
        return QueryOutput(query_BD=vectors_WD[positions.last()], positions_PD=vectors_WD)

    def _transformer_vectors(self, inputs: QueryInputs, wanted: torch.Tensor) -> torch.Tensor:
        """Vectors at the `wanted` flat positions."""
        history = inputs.history
        pooled_PW = self.transformer(history)
        positions = history.positions
        rows = positions.rows()[wanted]
        within = wanted - positions.offsets[rows]
        lengths = history.jagged.lengths[rows]
        # An empty history contributes nothing (its one position is padding).
        history_WD = self.projection(torch.where((lengths > 0)[:, None], pooled_PW[wanted], 0.0))
        # The event after position j: history event j + 1, or the query's for the last one.
        is_last = within == positions.lengths[rows] - 1
        following = (history.jagged.offsets[rows] + within + 1).clamp(max=max(history.jagged.total - 1, 0))
        if history.jagged.total:
            next_action_WD = torch.where(is_last[:, None], inputs.next_action_BD[rows], history.action_ND[following])
            next_time_W = torch.where(is_last, inputs.next_timestamp_B[rows], history.timestamp_N[following])
        else:
            next_action_WD, next_time_W = inputs.next_action_BD[rows], inputs.next_timestamp_B[rows]
        if self.next_time is not None:
            next_action_WD = next_action_WD + self.next_time(cyclic_time_features(next_time_W))
        actor_WD = inputs.actor_BD[rows]
        return F.normalize(self.combine(torch.cat([history_WD, actor_WD, next_action_WD], dim=-1)).float(), dim=-1)


class CandidateTower(nn.Module):
    """Target embedding (+ sparse feature embeddings, summed) -> residual item MLP -> unit vector."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim = config.embedding_dim
        self.mlp = MLP(dim, 2 * dim, dim, config.activation)

    def forward(self, target_ND: torch.Tensor, features_ND: torch.Tensor | None = None) -> torch.Tensor:
        x_ND = target_ND if features_ND is None else target_ND + features_ND
        # fp32 out, also under bf16 autocast (models/retrieval.py _tower_autocast).
        return F.normalize((x_ND + self.mlp(x_ND)).float(), dim=-1)
