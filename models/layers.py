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


def _keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bernoulli(1 - p') keep mask as floats 0 or 1 / (1 - p'), so E[out] = x exactly;
    p' = p to 1 / 65536: each entry compares 16 random bits with a threshold (64-bit random
    words give four entries each)."""
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    threshold = round(p * 65536)
    keep = words.view(torch.int16)[:numel].view(shape) >= threshold - 32768
    return keep.to(torch.float32).mul_(65536 / (65536 - threshold))


class _DropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        mask = _keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(mask)
        # Times the fp32 mask, then back to x's dtype: a bf16 mask would round the scale
        # 1 / (1 - p) and bias the mean.
        return (x * mask).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return (grad * mask).to(grad.dtype), None


class Dropout(nn.Module):
    """nn.Dropout with a 5x cheaper mask on CPU (measured 12 ms against 57-73 ms for a
    [128, 201, 256] tensor): torch's dropout draws a Bernoulli per entry, this compares 16
    random bits per entry with a threshold. Seeded by torch's generator like nn.Dropout."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout: expected 0 <= p < 1, got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return _DropoutFunction.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


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
        self.dropout = Dropout(dropout)

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
