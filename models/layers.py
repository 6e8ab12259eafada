"""Small building blocks shared by the towers and encoders.

Shape suffixes: B batch, L sequence positions, D width, K buckets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SECONDS_PER_DAY = 86400.0
SECONDS_PER_WEEK = 7 * SECONDS_PER_DAY
NUM_CYCLIC_FEATURES = 4


class SwiGLU(nn.Module):
    """Gated unit with its own weights: (SiLU(x W_gate) * x W_up) W_down."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(in_dim, 2 * hidden_dim)
        self.down = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class MLP(nn.Module):
    """Two-layer MLP with GELU, or a SwiGLU unit, chosen by `activation`."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, activation: str = "gelu", dropout: float = 0.0) -> None:
        super().__init__()
        if activation == "swiglu":
            self.net: nn.Module = SwiGLU(in_dim, hidden_dim, out_dim)
        elif activation == "gelu":
            self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
        else:
            raise ValueError(f"activation: expected 'gelu' or 'swiglu', got {activation!r}")
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.net(x))


def cyclic_time_features(timestamps: torch.Tensor) -> torch.Tensor:
    """sin/cos of hour of day and of weekday for Unix seconds. [...] -> [..., 4] float."""
    t = timestamps.to(torch.float64)
    day = 2 * math.pi * torch.remainder(t, SECONDS_PER_DAY) / SECONDS_PER_DAY
    week = 2 * math.pi * torch.remainder(t, SECONDS_PER_WEEK) / SECONDS_PER_WEEK
    return torch.stack([day.sin(), day.cos(), week.sin(), week.cos()], dim=-1).to(torch.float32)


def log_time_bucket(gap_seconds: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Log-spaced bucket of a time gap: 0 for |gap| < 1 s, then one bucket per factor of
    ~sqrt(2), capped at num_buckets - 1. Integer tensor of the same shape."""
    gap = gap_seconds.abs().to(torch.float32)
    bucket = torch.floor(2.0 * torch.log2(gap + 1.0))
    return bucket.clamp(0, num_buckets - 1).to(torch.int64)
