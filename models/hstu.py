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

Cost follows real tokens (models/length_groups.py): rows of similar length are encoded
together, each group padded only to its own longest row. The attention itself is one
blocked, causal autograd function (models/hstu_attention.py): the upper triangle of the
T x T square is never computed and nothing T x T is kept for backward.

Shape suffixes: B batch, T = L + 1 positions, D width, H heads, E head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.hstu_attention import causal_silu_attention
from models.layers import NUM_CYCLIC_FEATURES, Dropout, cyclic_time_features, log_time_bucket
from models.length_groups import JaggedHistory, LengthGrouping, encode_jagged

# Length-group cost model (models/length_groups.py), in units of one token through a
# layer's linear maps (10 D^2 multiply-adds): an attention pair costs ~4 D of them plus its
# memory-bound [H]-wide element-wise work, about as much again, so ~1 / D of a token; one
# more group costs ~1 ms per layer, which is GROUP_OVERHEAD_MACS / (10 D^2) tokens.
GROUP_OVERHEAD_MACS = 3.0e6 * 10


class RelativeAttentionBias(nn.Module):
    """Per-head bias from relative position (i - j) and log-bucketed |t_i - t_j|, as a
    table of every (time bucket, position) sum and each pair's index into it (the attention
    looks the bias up block by block, models/hstu_attention.py)."""

    def __init__(self, num_heads: int, max_positions: int, num_time_buckets: int) -> None:
        super().__init__()
        self.max_positions, self.num_time_buckets = max_positions, num_time_buckets
        self.position_bias = nn.Embedding(max_positions, num_heads)
        self.time_bias = nn.Embedding(num_time_buckets, num_heads)
        nn.init.zeros_(self.position_bias.weight)
        nn.init.zeros_(self.time_bias.weight)

    def table(self) -> torch.Tensor:
        """[H, K x P]: entry k x P + r is time bucket k's bias plus relative position r's."""
        table_HKP = self.time_bias.weight.t()[:, :, None] + self.position_bias.weight.t()[:, None, :]
        return table_HKP.reshape(table_HKP.shape[0], -1)

    def index(self, timestamps_BT: torch.Tensor) -> torch.Tensor:
        """[B, T] int64 seconds -> [B, T, T] int64 index of each pair into `table()`."""
        positions = torch.arange(timestamps_BT.shape[1], device=timestamps_BT.device)
        relative_TT = (positions[:, None] - positions[None, :]).clamp(0, self.max_positions - 1)
        time_bucket_BTT = log_time_bucket(timestamps_BT[:, :, None] - timestamps_BT[:, None, :], self.num_time_buckets)
        return time_bucket_BTT * self.max_positions + relative_TT

    def forward(self, timestamps_BT: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, H, T, T] bias, materialised (a reference; training never builds it)."""
        return F.embedding(self.index(timestamps_BT), self.table().t()).permute(0, 3, 1, 2)


class HSTULayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float, film: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.input_norm = nn.LayerNorm(dim)
        self.uvqk = nn.Linear(dim, 4 * dim)
        self.output_norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, dim)
        self.dropout = Dropout(dropout)
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
        multiplier_B1TT: torch.Tensor,
        bias_table_HN: torch.Tensor | None,
        bias_index_BTT: torch.Tensor | None,
    ) -> torch.Tensor:
        """`multiplier_B1TT`: causal and padding mask over the row's number of valid tokens;
        the relative attention bias as a table and each pair's index into it (or None)."""
        batch, num_positions, dim = x_BTD.shape
        h_BTD = x_BTD + next_BTD  # the next event's action (and time) enters every layer
        if self.film is not None:
            gamma_BD, beta_BD = self.film(actor_BD).chunk(2, dim=-1)
            h_BTD = film(h_BTD, gamma_BD, beta_BD)
        u, v, q, k = F.silu(self.uvqk(self.input_norm(h_BTD))).chunk(4, dim=-1)
        shape = (batch, num_positions, self.num_heads, self.head_dim)
        q_ZTE, k_ZTE, v_ZTE = (
            t.reshape(shape).transpose(1, 2).reshape(batch * self.num_heads, num_positions, self.head_dim)
            for t in (q, k, v)
        )
        y_ZTE = causal_silu_attention(
            q_ZTE, k_ZTE, v_ZTE, bias_table_HN, bias_index_BTT, multiplier_B1TT, self.num_heads,
            1.0 / math.sqrt(self.head_dim),
        )
        y_BTD = y_ZTE.reshape(batch, self.num_heads, num_positions, self.head_dim).transpose(1, 2)
        y_BTD = y_BTD.reshape(batch, num_positions, dim)
        return x_BTD + self.dropout(self.output(self.output_norm(y_BTD) * u))


def film(x_BTD: torch.Tensor, gamma_BD: torch.Tensor, beta_BD: torch.Tensor) -> torch.Tensor:
    """Feature-wise linear modulation: x * (1 + gamma) + beta, the same for every token
    (one fused pass over x)."""
    return torch.addcmul(beta_BD[:, None], x_BTD, 1.0 + gamma_BD[:, None])


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
        time_features: bool = False,
        relative_attention_bias: bool = True,
        num_time_buckets: int = 64,
        length_grouping: bool = True,
    ) -> None:
        super().__init__()
        self.max_len, self.num_time_buckets = max_len, num_time_buckets
        self.grouping = LengthGrouping(1.0 / dim, num_layers * GROUP_OVERHEAD_MACS / (10 * dim * dim), length_grouping)
        self.position = nn.Embedding(max_len + 1, dim)  # BOS is position 0
        nn.init.normal_(self.position.weight, std=0.02)
        self.gap = nn.Embedding(num_time_buckets, dim)  # time from this event to the next
        nn.init.normal_(self.gap.weight, std=0.02)
        self.time = nn.Linear(NUM_CYCLIC_FEATURES, dim) if time_features else None
        self.next_time = nn.Linear(NUM_CYCLIC_FEATURES, dim) if time_features else None
        self.bias = RelativeAttentionBias(num_heads, max_len + 1, num_time_buckets) if relative_attention_bias else None
        self.layers = nn.ModuleList(HSTULayer(dim, num_heads, dropout, film) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(dim)
        self.input_dropout = Dropout(dropout)

    def forward(
        self,
        history: JaggedHistory,
        actor_BD: torch.Tensor,
        query_action_BD: torch.Tensor,
        query_timestamp_B: torch.Tensor,
    ) -> torch.Tensor:
        """Jagged histories; `query_*` describe the event to predict (its action type and
        time, known at request time). Returns one output per `history.positions` entry,
        flat [P, D]: output j predicts the event after history event j; each row's last is
        the query's (the BOS output for an empty history)."""
        return encode_jagged(self._encode, history, (actor_BD, query_action_BD, query_timestamp_B), self.grouping)

    def _encode(
        self,
        history_target_BLD: torch.Tensor,
        history_action_BLD: torch.Tensor,
        history_timestamp_BL: torch.Tensor,
        mask_BL: torch.Tensor,
        actor_BD: torch.Tensor,
        query_action_BD: torch.Tensor,
        query_timestamp_B: torch.Tensor,
    ) -> torch.Tensor:
        """One block of rows, left-padded to a common width L: [B, L, D], zeros at padding
        (the last column of an empty row holds its BOS output)."""
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
        attention_BTT = causal_TT[None] & valid_BT[:, None, :] & valid_BT[:, :, None]
        multiplier_B1TT = (attention_BTT.to(x_BTD.dtype) / (lengths_B + 1).to(x_BTD.dtype)[:, None, None])[:, None]
        # Shared by every layer: the bias table (differentiable) and each pair's index.
        bias_table_HN = self.bias.table() if self.bias is not None else None
        bias_index_BTT = self.bias.index(current_time_BT) if self.bias is not None else None
        for layer in self.layers:
            x_BTD = layer(x_BTD, next_BTD, actor_BD, multiplier_B1TT, bias_table_HN, bias_index_BTT)
        # Real outputs: the history positions and BOS (the query position of an empty history).
        return torch.where(valid_BT[:, 1:, None], self.final_norm(x_BTD[:, 1:]), 0.0)
