"""HSTU history encoder (Zhai et al. 2024, "Actions Speak Louder than Words"), PyTorch
reference path.

Layout: the actor is the first token (BOS), followed by the history, left-padded:

    position   0    1    2     3    4     <-- L + 1 = 5 (max_len 4)
    row 0      pad  BOS  h1    h2   h3
    row 1      pad  pad  pad   BOS  h1
    mask value 0    2    1     1    1     (0 pad, 1 history, 2 BOS)

Position p predicts the event after it: BOS predicts h1, h_i predicts h_{i+1}, the
last position predicts the query's target. What is known about that next event
(its action type, when it happens, the gap since position p) is added to the input
of every layer as the "next" conditioning, so one causal pass serves every position.

Per layer: U, V, Q, K = SiLU(W LN(x)) (one fused linear map, multi-head);
A = SiLU(QK^T / sqrt(d) + RAB) / n, masked causally; Y = A V; x += W_o(LN(Y) * U).
RAB = learned bias from log-bucketed time gaps plus relative positions; n = number of
valid tokens of the row (so padding never changes a row's output).

Shape suffixes: B batch, T = L + 1 positions, D width, H heads, E head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import NUM_CYCLIC_FEATURES, cyclic_time_features, log_time_bucket


class RelativeAttentionBias(nn.Module):
    """Per-head bias from relative position (i - j) and log-bucketed |t_i - t_j|."""

    def __init__(self, num_heads: int, max_positions: int, num_time_buckets: int) -> None:
        super().__init__()
        self.max_positions, self.num_time_buckets = max_positions, num_time_buckets
        self.position_bias = nn.Embedding(max_positions, num_heads)
        self.time_bias = nn.Embedding(num_time_buckets, num_heads)
        nn.init.zeros_(self.position_bias.weight)
        nn.init.zeros_(self.time_bias.weight)

    def forward(self, timestamps_BT: torch.Tensor) -> torch.Tensor:
        """[B, T] int64 seconds -> [B, H, T, T] bias."""
        num_positions = timestamps_BT.shape[1]
        index = torch.arange(num_positions, device=timestamps_BT.device)
        relative = (index[:, None] - index[None, :]).clamp(0, self.max_positions - 1)
        time_bucket = log_time_bucket(timestamps_BT[:, :, None] - timestamps_BT[:, None, :], self.num_time_buckets)
        bias = self.position_bias(relative)[None] + self.time_bias(time_bucket)  # [B, T, T, H]
        return bias.permute(0, 3, 1, 2)


class HSTULayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float, film: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.input_norm = nn.LayerNorm(dim)
        self.uvqk = nn.Linear(dim, 4 * dim)
        self.output_norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        # FiLM from the actor's vector; zero-initialised so it starts as the identity.
        self.film = nn.Linear(dim, 2 * dim) if film else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(
        self,
        x_BTD: torch.Tensor,
        next_BTD: torch.Tensor,
        actor_BD: torch.Tensor,
        attention_mask_BTT: torch.Tensor,
        num_valid_B: torch.Tensor,
        bias_BHTT: torch.Tensor | None,
    ) -> torch.Tensor:
        batch, num_positions, dim = x_BTD.shape
        h_BTD = x_BTD + next_BTD  # the next event's action (and time) enters every layer
        if self.film is not None:
            gamma_BD, beta_BD = self.film(actor_BD).chunk(2, dim=-1)
            h_BTD = film(h_BTD, gamma_BD, beta_BD)
        u, v, q, k = F.silu(self.uvqk(self.input_norm(h_BTD))).chunk(4, dim=-1)
        shape = (batch, num_positions, self.num_heads, self.head_dim)
        q_BHTE, k_BHTE, v_BHTE = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        logits_BHTT = q_BHTE @ k_BHTE.transpose(-1, -2) / math.sqrt(self.head_dim)
        if bias_BHTT is not None:
            logits_BHTT = logits_BHTT + bias_BHTT
        weights_BHTT = F.silu(logits_BHTT) * attention_mask_BTT[:, None] / num_valid_B[:, None, None, None]
        y_BTD = (weights_BHTT @ v_BHTE).transpose(1, 2).reshape(batch, num_positions, dim)
        return x_BTD + self.dropout(self.output(self.output_norm(y_BTD) * u))


def film(x_BTD: torch.Tensor, gamma_BD: torch.Tensor, beta_BD: torch.Tensor) -> torch.Tensor:
    """Feature-wise linear modulation: x * (1 + gamma) + beta, the same for every token."""
    return x_BTD * (1.0 + gamma_BD[:, None]) + beta_BD[:, None]


class HSTUEncoder(nn.Module):
    """History -> one output per history position (aligned with the [B, L] history layout:
    output j predicts the event after history position j; the last column is the query)."""

    def __init__(
        self,
        dim: int,
        max_len: int,
        num_layers: int,
        num_heads: int,
        dropout: float,
        *,
        film: bool = True,
        time_features: bool = True,
        relative_attention_bias: bool = True,
        num_time_buckets: int = 64,
    ) -> None:
        super().__init__()
        self.max_len, self.num_time_buckets = max_len, num_time_buckets
        self.position = nn.Embedding(max_len + 1, dim)  # BOS is position 0
        nn.init.normal_(self.position.weight, std=0.02)
        self.gap = nn.Embedding(num_time_buckets, dim)  # time from this event to the next
        nn.init.normal_(self.gap.weight, std=0.02)
        self.time = nn.Linear(NUM_CYCLIC_FEATURES, dim) if time_features else None
        self.next_time = nn.Linear(NUM_CYCLIC_FEATURES, dim) if time_features else None
        self.bias = RelativeAttentionBias(num_heads, max_len + 1, num_time_buckets) if relative_attention_bias else None
        self.layers = nn.ModuleList(HSTULayer(dim, num_heads, dropout, film) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(dim)
        self.input_dropout = nn.Dropout(dropout)

    def forward(
        self,
        history_target_BLD: torch.Tensor,
        history_action_BLD: torch.Tensor,
        history_timestamp_BL: torch.Tensor,
        mask_BL: torch.Tensor,
        actor_BD: torch.Tensor,
        query_action_BD: torch.Tensor,
        query_timestamp_B: torch.Tensor,
    ) -> torch.Tensor:
        """Histories left-padded to [B, L]; `query_*` describe the event to predict (its
        action type and time, known at request time). Returns [B, L, D]."""
        batch, max_len, dim = history_target_BLD.shape
        lengths_B = mask_BL.sum(1)
        bos_index_B = max_len - lengths_B  # position of BOS in the L + 1 layout

        tokens_BLD = history_target_BLD + history_action_BLD
        if self.time is not None:
            tokens_BLD = tokens_BLD + self.time(cyclic_time_features(history_timestamp_BL))
        rows = torch.arange(batch, device=actor_BD.device)
        x_BTD = torch.cat([torch.zeros_like(actor_BD)[:, None], tokens_BLD], dim=1)
        x_BTD = x_BTD.index_put((rows, bos_index_B), actor_BD)
        valid_BT = torch.cat([torch.zeros((batch, 1), dtype=torch.bool, device=mask_BL.device), mask_BL], dim=1)
        valid_BT = valid_BT.index_put((rows, bos_index_B), torch.ones_like(lengths_B, dtype=torch.bool))

        # Position 0 for BOS, 1.. for the history, counted from the row's own start.
        local_BT = (torch.arange(max_len + 1, device=x_BTD.device)[None] - bos_index_B[:, None]).clamp(0, self.max_len)
        x_BTD = self.input_dropout(x_BTD + self.position(local_BT))

        # Next-event conditioning in the L + 1 layout: position p's next event is entry p of
        # [history..., query] (BOS's next event is the first history event).
        next_action_BTD = torch.cat([history_action_BLD, query_action_BD[:, None]], dim=1)
        next_time_BT = torch.cat([history_timestamp_BL, query_timestamp_B[:, None]], dim=1)
        current_time_BT = torch.cat([next_time_BT[:, :1], history_timestamp_BL], dim=1)  # BOS entry set below
        current_time_BT = current_time_BT.index_put((rows, bos_index_B), next_time_BT[rows, bos_index_B])
        next_BTD = next_action_BTD + self.gap(log_time_bucket(next_time_BT - current_time_BT, self.num_time_buckets))
        if self.next_time is not None:
            next_BTD = next_BTD + self.next_time(cyclic_time_features(next_time_BT))

        causal_TT = torch.ones(max_len + 1, max_len + 1, dtype=torch.bool, device=x_BTD.device).tril()
        attention_mask_BTT = (causal_TT[None] & valid_BT[:, None, :] & valid_BT[:, :, None]).to(x_BTD.dtype)
        num_valid_B = (lengths_B + 1).to(x_BTD.dtype)
        bias_BHTT = self.bias(current_time_BT) if self.bias is not None else None
        for layer in self.layers:
            x_BTD = layer(x_BTD, next_BTD, actor_BD, attention_mask_BTT, num_valid_B, bias_BHTT)
        return self.final_norm(x_BTD[:, 1:])
