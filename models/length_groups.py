"""Length groups: cost that grows with real tokens, not with the batch's longest history.

Histories stay jagged (flat values + per-row lengths) everywhere but inside an encoder's
attention, which needs rows of one width. Padding the whole batch to its longest row
costs B x L tokens and B x L^2 attention pairs however short most rows are, and real
logs have heavy-tailed lengths (most histories short, a few at the cap), so most of that
would be padding. Instead the rows are split into groups of similar length; each group
is laid out as a right-aligned [rows, width] block at the width of its own longest row
(`to_block`), encoded, and its real entries taken back into the flat layout
(`from_blocks`). Both encoders are padding-invariant (a row's output does not depend on
how far it is padded), so the split changes no row's result beyond float rounding
(tests/models/test_length_groups.py).

The split minimises the estimated cost of the whole batch by dynamic programming over
the rows sorted by length:

    cost(group) = rows x (width + quadratic_weight x width^2) + group_overhead

in units of one token through the linear maps: `quadratic_weight` is the attention cost
of one pair relative to that (~1 / D for HSTU), `group_overhead` the fixed cost of one
more pass through the layers (kernel launches, Python), in the same units.

Shape suffixes: B batch rows, N flat entries, n a group's rows, W its width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch


def plan_groups(lengths: np.ndarray, quadratic_weight: float, group_overhead: float) -> list[tuple[np.ndarray, int]]:
    """(row indices, width) per group, the cheapest split; widths are >= 1."""
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


@dataclass(frozen=True)
class Jagged:
    """Row lengths of a jagged batch; entry j of row b is flat entry offsets[b] + j."""

    lengths: torch.Tensor
    """[B] int64."""

    @property
    def offsets(self) -> torch.Tensor:
        return torch.cumsum(self.lengths, 0) - self.lengths

    @property
    def total(self) -> int:
        return int(self.lengths.sum())

    def rows(self) -> torch.Tensor:
        """[N] the row of each flat entry."""
        return torch.repeat_interleave(torch.arange(len(self.lengths), device=self.lengths.device), self.lengths)

    def last(self) -> torch.Tensor:
        """[B] flat index of each row's last entry (rows must be non-empty)."""
        return torch.cumsum(self.lengths, 0) - 1


@dataclass(frozen=True)
class LengthGroup:
    rows: torch.Tensor
    """[n] int64 batch rows of the group, in the order its block holds them."""
    width: int
    """Columns of the group's block: >= every one of its rows' lengths."""

    def entries(self, jagged: Jagged) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(flat index, block row, block column) of each entry of the group's rows in
        `jagged`, right-aligned in the [n, width] block (row b's last entry in column
        width - 1); entries of rows longer than `width` are not included."""
        lengths = jagged.lengths[self.rows].clamp(max=self.width)
        block_row = torch.repeat_interleave(torch.arange(len(self.rows), device=lengths.device), lengths)
        within = torch.arange(block_row.numel(), device=lengths.device) - (torch.cumsum(lengths, 0) - lengths)[block_row]
        skipped = jagged.lengths[self.rows] - lengths  # the oldest entries that do not fit
        flat = (jagged.offsets[self.rows] + skipped)[block_row] + within
        return flat, block_row, self.width - lengths[block_row] + within


@dataclass
class LengthGrouping:
    """How an encoder splits a batch: the cost model's weights (module doc), or off (one
    block as wide as the longest row)."""

    quadratic_weight: float
    group_overhead: float
    enabled: bool = True

    def groups(self, lengths_B: torch.Tensor) -> list[LengthGroup]:
        if not self.enabled:
            return one_group(lengths_B)
        return length_groups(lengths_B, self.quadratic_weight, self.group_overhead)


def length_groups(lengths_B: torch.Tensor, quadratic_weight: float, group_overhead: float) -> list[LengthGroup]:
    """Groups of rows to encode apart (see the module doc). One group of every row when
    splitting does not pay."""
    plan = plan_groups(lengths_B.detach().cpu().numpy().astype(np.int64), quadratic_weight, group_overhead)
    if len(plan) == 1:
        return one_group(lengths_B)  # the rows in batch order, as without groups
    device = lengths_B.device
    return [LengthGroup(torch.from_numpy(rows).to(device), width) for rows, width in plan]


def one_group(lengths_B: torch.Tensor) -> list[LengthGroup]:
    """Every row in one block as wide as the longest (no split)."""
    if lengths_B.numel() == 0:
        return []
    rows = torch.arange(len(lengths_B), device=lengths_B.device)
    return [LengthGroup(rows, max(int(lengths_B.max()), 1))]


def to_block(values_N: torch.Tensor, entries: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rows: int, width: int):
    """Flat values [N, ...] -> a group's right-aligned block [rows, width, ...], zeros (or
    False) at padding. Differentiable in `values_N`."""
    flat, block_row, block_column = entries
    block = values_N.new_zeros((rows, width, *values_N.shape[1:]))
    return block.index_put((block_row, block_column), values_N.index_select(0, flat))


def block_mask(entries: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rows: int, width: int, device) -> torch.Tensor:
    """[rows, width] bool: True at the block's real entries."""
    _, block_row, block_column = entries
    mask = torch.zeros((rows, width), dtype=torch.bool, device=device)
    mask[block_row, block_column] = True
    return mask


def from_blocks(blocks: list[torch.Tensor], entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], total: int):
    """Per-group blocks [n, W, ...] -> their real entries in flat order [total, ...]
    (every flat entry must be covered by exactly one group). Differentiable."""
    values = torch.cat([block[block_row, block_column] for block, (_, block_row, block_column) in zip(blocks, entries)])
    flat = torch.cat([flat for flat, _, _ in entries])
    return values.new_empty((total, *values.shape[1:])).index_copy(0, flat, values)


@dataclass(frozen=True)
class JaggedHistory:
    """The encoder window of each row, flat: embeddings of its targets and actions and its
    timestamps, oldest first."""

    target_ND: torch.Tensor
    action_ND: torch.Tensor
    timestamp_N: torch.Tensor
    jagged: Jagged

    @property
    def positions(self) -> Jagged:
        """The encoders' output rows: one per history event (output j predicts the event
        after event j, the last one the query's target), and one for an empty history."""
        return Jagged(self.jagged.lengths.clamp(min=1))


def encode_jagged(
    encode: Callable[..., torch.Tensor],
    history: JaggedHistory,
    per_row: Sequence[torch.Tensor],
    grouping: LengthGrouping,
) -> torch.Tensor:
    """`encode(target, action, timestamp, mask, *per_row)` over each group's block
    ([n, W, D], [n, W, D], [n, W], [n, W] bool, then [n, ...] per row) returns [n, W, ...];
    its outputs at `history.positions` (right-aligned in the block, the last column an
    empty row's) come back flat, [sum of positions, ...]."""
    positions = history.positions
    blocks, output_entries = [], []
    for group in grouping.groups(history.jagged.lengths):
        rows, width = len(group.rows), group.width
        entries = group.entries(history.jagged)
        mask = block_mask(entries, rows, width, history.target_ND.device)
        block_inputs = [to_block(values, entries, rows, width) for values in
                        (history.target_ND, history.action_ND, history.timestamp_N)]
        blocks.append(encode(*block_inputs, mask, *(t[group.rows] for t in per_row)))
        output_entries.append(group.entries(positions))
    if not blocks:
        raise ValueError("encode_jagged: an empty batch has nothing to encode")
    return from_blocks(blocks, output_entries, positions.total)
