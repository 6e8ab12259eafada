"""Length groups: cost that grows with real tokens, not with the batch's longest history.

A batch of left-padded histories [B, L] costs an encoder B x L tokens and B x L^2
attention pairs when it is run as one block, however short most rows are. Real logs have
heavy-tailed lengths (most histories short, a few at the cap), so most of that is
padding. `length_groups` splits the rows into groups of similar length; the encoder runs
each group at the width of its own longest row (the last `width` columns of the left-padded
layout hold every real entry of the group's rows) and `scatter_groups` puts the results
back in the batch's layout. Both encoders are padding-invariant (a row's output does not
depend on how far it is padded), so grouping changes no row's result beyond float
rounding (tests/models/test_length_groups.py).

The split minimises the estimated cost of the whole batch by dynamic programming over
the rows sorted by length:

    cost(group) = rows x (width + quadratic_weight x width^2) + group_overhead

in units of one token through the linear maps: `quadratic_weight` is the attention cost
of one pair relative to that (~1 / (5 D) for HSTU), `group_overhead` the fixed cost of
one more pass through the layers (kernel launches, Python), in the same units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LengthGroup:
    rows: torch.Tensor
    """[n] int64 row indices of the batch, in the order the group holds them."""
    width: int
    """Columns kept: the last `width` of the padded layout (>= every row's length)."""


def plan_groups(lengths: np.ndarray, quadratic_weight: float, group_overhead: float) -> list[tuple[np.ndarray, int]]:
    """(row indices, width) per group, cheapest split first-found; widths are >= 1."""
    order = np.argsort(lengths, kind="stable")
    widths = np.maximum(lengths[order], 1).astype(np.float64)
    rows = len(order)
    if rows == 0:
        return []
    # best[j]: cheapest cost of the first j sorted rows; a group ends at j - 1 and has
    # width widths[j - 1] (the sorted order makes the last row the longest).
    best = np.zeros(rows + 1)
    start_of = np.zeros(rows + 1, dtype=np.int64)
    starts = np.arange(rows)
    for end in range(1, rows + 1):
        width = widths[end - 1]
        per_row = width + quadratic_weight * width * width
        candidates = best[:end] + (end - starts[:end]) * per_row + group_overhead
        start = int(np.argmin(candidates))
        best[end], start_of[end] = candidates[start], start
    groups, end = [], rows
    while end > 0:
        start = int(start_of[end])
        groups.append((order[start:end], int(widths[end - 1])))
        end = start
    return groups[::-1]


def length_groups(
    lengths_B: torch.Tensor, quadratic_weight: float, group_overhead: float
) -> list[LengthGroup]:
    """Groups of rows to encode apart (see the module doc). One group of every row when
    splitting does not pay."""
    plan = plan_groups(lengths_B.detach().cpu().numpy().astype(np.int64), quadratic_weight, group_overhead)
    device = lengths_B.device
    return [LengthGroup(torch.from_numpy(rows).to(device), width) for rows, width in plan]


def scatter_groups(outputs: list[torch.Tensor], groups: list[LengthGroup], width: int) -> torch.Tensor:
    """Per-group outputs [n_g, width_g, ...] -> the batch's [B, width, ...], left-padded with
    zeros, rows back in batch order (differentiable). The groups' rows, concatenated, must
    be the order the outputs' rows come in."""
    padded = [F.pad(out, (0, 0) * (out.dim() - 2) + (width - out.shape[1], 0)) for out in outputs]
    rows = torch.cat([group.rows for group in groups])
    inverse = torch.empty_like(rows)
    inverse[rows] = torch.arange(len(rows), device=rows.device)
    return torch.cat(padded)[inverse]


def encode_in_length_groups(
    encode: Callable[..., torch.Tensor],
    per_position: Sequence[torch.Tensor],
    per_row: Sequence[torch.Tensor],
    mask_BL: torch.Tensor,
    quadratic_weight: float,
    group_overhead: float,
) -> torch.Tensor:
    """`encode(*per_position, *per_row)` -> [B, L, ...], run per length group.

    per_position: left-padded [B, L, ...] tensors (mask_BL among them, where `encode` needs
    it); per_row: [B, ...] tensors. Each group gets its rows and the last `width` columns,
    which hold every real entry of them; `encode` must give zeros (or anything: they are
    dropped) at padding positions. One group: `encode` sees the batch itself."""
    groups = length_groups(mask_BL.sum(1), quadratic_weight, group_overhead)
    if len(groups) <= 1:
        return encode(*per_position, *per_row)
    # Rows sorted into their groups once (one gather), then split into views.
    order, sizes = torch.cat([g.rows for g in groups]), [len(g.rows) for g in groups]
    position_parts = [torch.split(t[order], sizes) for t in per_position]
    row_parts = [torch.split(t[order], sizes) for t in per_row]
    outputs = [
        encode(*(parts[i][:, -g.width :] for parts in position_parts), *(parts[i] for parts in row_parts))
        for i, g in enumerate(groups)
    ]
    return scatter_groups(outputs, groups, mask_BL.shape[1])
