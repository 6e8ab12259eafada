"""HSTU's pointwise attention, blocked and causal, as one autograd function:

    Y = (SiLU(Q K^T / sqrt(E) + bias) * multiplier) V

`multiplier` [B, 1, T, T] is the causal and padding mask over each row's number of valid
tokens; `bias[b, h, i, j] = table[h, index[b, i, j]]` is the relative attention bias (one
table of every (time bucket, relative position) sum, looked up per pair).

Why by hand: there is no softmax, so a query block needs nothing from other blocks, and
- causal: the block of queries [s, e) only meets keys [0, e); the upper triangle of the
  T x T square (half of it at long T) is never computed;
- past a memory budget nothing T x T is kept for backward: each block's pre-activation
  is recomputed there (one more Q K^T per block), so a layer keeps Q, K, V instead of
  two [B, H, T, T] tensors; below it (most batches) the blocks' pre-activations and
  weights are kept, which is faster;
- the bias gradient goes straight into the table by a bincount per head and block, never
  through a [B, H, T, T] gradient or an embedding backward (measured 5x slower).
The eager path this replaces (materialised weights, autograd through SiLU, mask, bias
and the bias lookup) is the reference of tests/models/test_length_groups.py.

Shape suffixes: B batch rows, H heads, Z = B x H, T positions, E head width, N table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KEEP_ELEMENTS = 2**24
"""Pre-activations a call keeps for backward (with its weights: 128 MB in fp32) before it
switches to recomputing them. Measured: keeping them made bench/train.py's HSTU step 6% faster (1.26 -> 1.19 s)."""

BLOCK = 128
"""Queries per block. Measured (bench/seq_len.py, D 256): 128 beat 64 at histories of up
to 1000 (202 against 218 us per token) and matched it at 200; below 128 positions a
group is one block, as before."""


def _block_pre(q_ZTE, k_ZTE, table_HN, index_BTT, start: int, end: int, num_heads: int, scale: float):
    """Pre-activation of queries [start, end) against keys [0, end): [Z, end - start, end]."""
    q_block, k_block = q_ZTE[:, start:end], k_ZTE[:, :end].transpose(1, 2)
    if table_HN is None:
        return torch.bmm(q_block, k_block).mul_(scale)
    index = index_BTT[:, start:end, :end]
    # In q's dtype: under bf16 autocast the whole block is bf16 (baddbmm of mixed dtypes
    # fails outside autocast, in backward).
    bias = F.embedding(index, table_HN.t().to(q_ZTE.dtype)).permute(0, 3, 1, 2).reshape(-1, end - start, end)
    return torch.baddbmm(bias, q_block, k_block, alpha=scale)


def _times_multiplier_(values_ZQK, multiplier_B1TT, start: int, end: int):
    """values *= the block's multiplier, in place, broadcast over heads (no per-head copy)."""
    batch = multiplier_B1TT.shape[0]
    values_ZQK.view(batch, -1, end - start, end).mul_(multiplier_B1TT[:, :, start:end, :end])
    return values_ZQK


class CausalSiLUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_ZTE, k_ZTE, v_ZTE, table_HN, index_BTT, multiplier_B1TT, num_heads: int, scale: float):
        positions = q_ZTE.shape[1]
        multiplier_B1TT = multiplier_B1TT.to(q_ZTE.dtype)
        y_ZTE = torch.empty_like(v_ZTE)
        # Keep each block's pre-activation and weights for backward while they are small;
        # past the budget, backward recomputes them (memory stays O(T x BLOCK)).
        keep = q_ZTE.shape[0] * positions * (positions + BLOCK) // 2 <= KEEP_ELEMENTS
        kept = []
        for start in range(0, positions, BLOCK):
            end = min(start + BLOCK, positions)
            pre = _block_pre(q_ZTE, k_ZTE, table_HN, index_BTT, start, end, num_heads, scale)
            weights = _times_multiplier_(F.silu(pre), multiplier_B1TT, start, end)
            y_ZTE[:, start:end] = torch.bmm(weights, v_ZTE[:, :end])
            if keep:
                kept.append((pre, weights))
        ctx.kept = kept  # intermediates, neither inputs nor outputs: held on ctx
        ctx.save_for_backward(q_ZTE, k_ZTE, v_ZTE, table_HN, index_BTT, multiplier_B1TT)
        ctx.num_heads, ctx.scale = num_heads, scale
        return y_ZTE

    @staticmethod
    def backward(ctx, grad_y_ZTE):
        q_ZTE, k_ZTE, v_ZTE, table_HN, index_BTT, multiplier_B1TT = ctx.saved_tensors
        num_heads, scale = ctx.num_heads, ctx.scale
        positions = q_ZTE.shape[1]
        grad_y_ZTE = grad_y_ZTE.contiguous().to(q_ZTE.dtype)
        # K and V gradients sum over query blocks: in fp32 when the inputs are bf16 (each
        # block's product rounded once, the sum not). Q's get one product per block.
        accumulate = torch.promote_types(q_ZTE.dtype, torch.float32)
        grad_q = torch.zeros_like(q_ZTE)
        grad_k, grad_v = torch.zeros_like(k_ZTE, dtype=accumulate), torch.zeros_like(v_ZTE, dtype=accumulate)
        grad_table = None if table_HN is None else torch.zeros_like(table_HN)
        if grad_table is not None:
            head_offsets_1H11 = (torch.arange(num_heads, device=q_ZTE.device) * table_HN.shape[1]).view(1, -1, 1, 1)
        kept, ctx.kept = ctx.kept, None
        for block, start in enumerate(range(0, positions, BLOCK)):
            end = min(start + BLOCK, positions)
            if kept:
                pre, weights = kept[block]
            else:
                pre = _block_pre(q_ZTE, k_ZTE, table_HN, index_BTT, start, end, num_heads, scale)
                weights = _times_multiplier_(F.silu(pre), multiplier_B1TT, start, end)
            grad_block = grad_y_ZTE[:, start:end]
            _add_bmm_(grad_v[:, :end], weights.transpose(1, 2), grad_block)
            grad_weights = torch.bmm(grad_block, v_ZTE[:, :end].transpose(1, 2))
            grad_pre = torch.ops.aten.silu_backward(_times_multiplier_(grad_weights, multiplier_B1TT, start, end), pre)
            grad_q[:, start:end].baddbmm_(grad_pre, k_ZTE[:, :end], alpha=scale)
            _add_bmm_(grad_k[:, :end], grad_pre.transpose(1, 2), q_ZTE[:, start:end], alpha=scale)
            if grad_table is not None:
                # One bincount for every head: head h's entries are offset by h x N.
                entries = table_HN.shape[1]
                index = index_BTT[:, None, start:end, :end] + head_offsets_1H11
                grad_table += torch.bincount(
                    index.reshape(-1), weights=grad_pre.reshape(-1).float(), minlength=num_heads * entries
                ).view(num_heads, entries)
        return grad_q, grad_k.to(k_ZTE.dtype), grad_v.to(v_ZTE.dtype), grad_table, None, None, None, None


def _add_bmm_(out_ZMN, a_ZMK, b_ZKN, alpha: float = 1.0) -> None:
    """out += alpha a b, in place: one baddbmm_ when the dtypes agree, else the product in
    the operands' dtype added into the (fp32) accumulator."""
    if out_ZMN.dtype == a_ZMK.dtype:
        out_ZMN.baddbmm_(a_ZMK, b_ZKN, alpha=alpha)
    else:
        out_ZMN.add_(torch.bmm(a_ZMK, b_ZKN), alpha=alpha)


def causal_silu_attention(q_ZTE, k_ZTE, v_ZTE, table_HN, index_BTT, multiplier_B1TT, num_heads: int, scale: float):
    """Y [Z, T, E] (see the module doc). `table_HN` / `index_BTT` None: no bias."""
    return CausalSiLUAttention.apply(q_ZTE, k_ZTE, v_ZTE, table_HN, index_BTT, multiplier_B1TT, num_heads, scale)
