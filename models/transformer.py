"""Transformer history encoder (and, with `causal=True` and last-token pooling, the
SASRec-style baseline).

Each history token is [action embedding ; target embedding] (width 2D), plus a learned
position embedding counted from the newest token (so left padding never shifts it)
and, optionally, projected cyclic time features. Pre-norm layers of multi-head
attention with a key-padding mask (causal on request) and a feed-forward MLP (GELU or
SwiGLU). Every token may attend to itself, so a fully padded row stays finite.

The history vector is pooled per history position ("prefix pooling"): entry j of the
output is the mean over valid tokens up to j (or token j itself for last-token
pooling), so with a causal encoder every position can be trained to predict the event
after it (temporal pretraining); the last entry is the query's history vector.
Without `causal`, only the last entry is meaningful.

Shape suffixes: B batch, L positions, W = 2D token width, H heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import MLP, NUM_CYCLIC_FEATURES, Dropout, cyclic_time_features
from models.length_groups import JaggedHistory, LengthGrouping, encode_jagged


class TransformerLayer(nn.Module):
    def __init__(self, width: int, num_heads: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attention_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attention_output = nn.Linear(width, width)
        self.feed_forward_norm = nn.LayerNorm(width)
        self.feed_forward = MLP(width, 2 * width, width, activation)
        self.dropout = Dropout(dropout)
        self.attention_dropout = Dropout(dropout)

    def forward(self, x_BLW: torch.Tensor, attention_bias_B1LL: torch.Tensor) -> torch.Tensor:
        """`attention_bias_B1LL`: 0 where a token may attend, -inf where not."""
        batch, length, width = x_BLW.shape
        q, k, v = self.qkv(self.attention_norm(x_BLW)).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        if self.training and self.attention_dropout.p > 0:
            # Spelled out so the attention weights go through the cheap dropout mask
            # (scaled_dot_product_attention's own dropout draws a Bernoulli per weight).
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2) + attention_bias_B1LL
            attended = self.attention_dropout(torch.softmax(scores, dim=-1)) @ v
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias_B1LL)
        x_BLW = x_BLW + self.dropout(self.attention_output(attended.transpose(1, 2).reshape(batch, length, width)))
        return x_BLW + self.dropout(self.feed_forward(self.feed_forward_norm(x_BLW)))


class TransformerEncoder(nn.Module):
    """Jagged history -> prefix-pooled history vectors, one per position (see module doc)."""

    def __init__(
        self,
        dim: int,
        max_len: int,
        num_layers: int,
        num_heads: int,
        dropout: float,
        *,
        activation: str = "gelu",
        causal: bool = False,
        pooling: str = "mean",
        time_features: bool = False,
        length_grouping: bool = True,
    ) -> None:
        super().__init__()
        width = 2 * dim
        self.causal, self.pooling, self.max_len = causal, pooling, max_len
        self.position_from_end = nn.Embedding(max_len, width)
        nn.init.normal_(self.position_from_end.weight, std=0.02)
        self.time = nn.Linear(NUM_CYCLIC_FEATURES, width) if time_features else None
        self.layers = nn.ModuleList(TransformerLayer(width, num_heads, dropout, activation) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(width)
        self.input_dropout = Dropout(dropout)
        # Length groups (models/length_groups.py): width W = 2D, a token's linear maps are
        # 16 W^2 multiply-adds, an attention pair ~4 W plus its element-wise work.
        self.grouping = LengthGrouping(1.0 / (2 * width), num_layers * 3.0e7 / (16 * width * width), length_grouping)

    def forward(self, history: JaggedHistory) -> torch.Tensor:
        """Jagged histories -> [P, 2D], one pooled vector per `history.positions` entry
        (zeros for an empty history)."""
        return encode_jagged(self._encode, history, (), self.grouping)

    def _encode(
        self,
        history_target_BLD: torch.Tensor,
        history_action_BLD: torch.Tensor,
        history_timestamp_BL: torch.Tensor,
        mask_BL: torch.Tensor,
    ) -> torch.Tensor:
        batch, length, _ = history_target_BLD.shape
        tokens_BLW = torch.cat([history_action_BLD, history_target_BLD], dim=-1)
        # Counted from the newest token; entries beyond the table are padding (masked).
        from_end_L = torch.arange(length - 1, -1, -1, device=tokens_BLW.device).clamp(max=self.max_len - 1)
        tokens_BLW = tokens_BLW + self.position_from_end(from_end_L)[None]
        if self.time is not None:
            tokens_BLW = tokens_BLW + self.time(cyclic_time_features(history_timestamp_BL))
        x_BLW = self.input_dropout(tokens_BLW)

        allowed_BLL = mask_BL[:, None, :].expand(batch, length, length)
        if self.causal:
            allowed_BLL = allowed_BLL & torch.ones(length, length, dtype=torch.bool, device=x_BLW.device).tril()
        allowed_BLL = allowed_BLL | torch.eye(length, dtype=torch.bool, device=x_BLW.device)
        attention_bias_B1LL = torch.zeros(allowed_BLL.shape, dtype=x_BLW.dtype, device=x_BLW.device).masked_fill_(
            ~allowed_BLL, float("-inf")
        )[:, None]
        for layer in self.layers:
            x_BLW = layer(x_BLW, attention_bias_B1LL)
        x_BLW = self.final_norm(x_BLW)

        if self.pooling == "last":
            return torch.where(mask_BL[..., None], x_BLW, 0.0)
        # Mean over valid tokens up to each position; padding contributes exact zeros.
        valid_BL1 = mask_BL[..., None].to(x_BLW.dtype)
        summed_BLW = torch.cumsum(torch.where(mask_BL[..., None], x_BLW, 0.0), dim=1)
        return summed_BLW / torch.cumsum(valid_BL1, dim=1).clamp(min=1.0)
