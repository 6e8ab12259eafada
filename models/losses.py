"""Sampled softmax on cosine similarity with temperature, logQ correction, masks and
top-k hard negatives.

For a query x with positive i+ and negative columns j from one or more sources:

    logit(c) = cos(q(x), c) / tau + bonus(x, c) - log q(c)
    L = -log softmax over [logit(i+), logit(j) for every unmasked negative j]

log q(c) is the column's expected number of appearances in its source (see
`models/samplers.py`). The positive is in the softmax with certainty, so its log q is
0 (`positive_log_q` overrides that); with every target as a negative and uniform q this
is exactly the full softmax, and with any sampler it is the importance-sampling
estimate of it (tests/models/test_losses.py checks both).

Masks (a masked column contributes nothing to loss or gradient; positives are never
masked): accidental hits (a negative with the positive's ID), targets in the actor's own
history (when asked), negatives that duplicate a column of the history source, padding,
in-batch negatives more similar than a threshold to the positive, and, with hard
negatives, every column outside the top-k of its source.

Queries come as [B, P, D]: P = 1 for the main loss, P = history positions for temporal
pretraining (every position at once, no loop).

Shape suffixes: B examples, P positions per example, N columns of a source, D width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from models.samplers import SampledNegatives

_MASKED_LOGIT = -1e30
MASK_REASONS = ("accidental_hit", "in_history", "duplicate_of_history", "too_similar", "not_hard")


@dataclass(frozen=True)
class LossSettings:
    temperature: float
    logq_correction: bool = True
    mask_history: bool = False
    """Mask negatives that are in the example's history (needs `history_contains`)."""
    similarity_mask_threshold: float = 0.99
    hard_topk: int | None = None
    """Keep the top-k highest-scoring unmasked negatives of each source (None: all)."""
    telemetry: bool = True
    """Compute the telemetry (masked fractions, similarities, log q means). Off on the
    training steps whose scalars are not logged: it costs passes over every logit."""
    count_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Sums a count over ranks. The loss is then this rank's share of the global mean
    (its examples' sum / the global count), so gradients summed over ranks are exactly
    those of one process on the whole global batch. None: one process."""


@dataclass
class LossOutput:
    loss: torch.Tensor
    telemetry: dict[str, float] = field(default_factory=dict)


def hard_topk_schedule(step: int, start: int, end: int, num_steps: int, schedule: str) -> int:
    """Curriculum on k: from `start` at step 0 to `end` at `num_steps` (then `end`)."""
    progress = min(max(step, 0) / num_steps, 1.0)
    if schedule == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return int(round(start + (end - start) * progress))


def temporal_weight_at(step: int, weight: float, decay_steps: int) -> float:
    """The temporal loss's weight at a training step: `weight` throughout (decay_steps 0),
    or falling linearly from `weight` at step 0 to 0 at `decay_steps`."""
    if not decay_steps:
        return weight
    return weight * max(0.0, 1.0 - max(step, 0) / decay_steps)


def _column_scores(query_BPD: torch.Tensor, source: SampledNegatives) -> torch.Tensor:
    if source.cosine is not None:
        if query_BPD.shape[1] != 1:
            raise ValueError(f"source {source.name!r} gives cosines for one query per example, got {query_BPD.shape[1]}")
        return source.cosine[:, None, :]
    # matmul / bmm, not einsum: einsum copied the [B, P, D] queries into a new layout first.
    if source.per_example:
        return torch.bmm(query_BPD, source.embeddings.transpose(1, 2))
    return query_BPD @ source.embeddings.t()


def _per_example(tensor: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Shared [N] column property -> [B, 1, N]; per-example [B, N] -> [B, 1, N]."""
    if tensor is None:
        return None
    return (tensor[None].expand(batch, -1) if tensor.dim() == 1 else tensor)[:, None, :]


def _top_k_mask(scores_BPN: torch.Tensor, masked_BPN: torch.Tensor, k: int) -> torch.Tensor:
    """True for unmasked columns outside the top-k scores of their row."""
    if k >= scores_BPN.shape[-1]:
        return torch.zeros_like(masked_BPN)
    candidates = scores_BPN.masked_fill(masked_BPN, float("-inf"))
    keep_index = candidates.topk(k, dim=-1).indices
    keep = torch.zeros_like(masked_BPN).scatter_(-1, keep_index, True)
    return ~keep & ~masked_BPN


def sampled_softmax_loss(
    query_BPD: torch.Tensor,
    positive_BPD: torch.Tensor,
    positive_ids_BP: torch.Tensor,
    sources: list[SampledNegatives],
    settings: LossSettings,
    *,
    valid_BP: torch.Tensor | None = None,
    positive_bonus_BP: torch.Tensor | None = None,
    positive_log_q_BP: torch.Tensor | None = None,
    history_contains: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> LossOutput:
    """Mean loss over valid (example, position) pairs, with telemetry.

    history_contains: maps ids [B, N] to a [B, N] bool "is in example b's history". Used
    to mask negatives in the history (`mask_history`) and, when a `history` source is
    among `sources`, to mask other columns that duplicate one of its columns.
    """
    batch, positions, _ = query_BPD.shape
    tau = settings.temperature
    positive_cos_BP = (query_BPD * positive_BPD).sum(-1)
    positive_logit_BP = positive_cos_BP / tau
    if positive_bonus_BP is not None:
        positive_logit_BP = positive_logit_BP + positive_bonus_BP
    if settings.logq_correction and positive_log_q_BP is not None:
        positive_logit_BP = positive_logit_BP - positive_log_q_BP

    history_source = next((s for s in sources if s.certain), None)
    # log-sum-exp per source, combined at the end: no [B, P, 1 + N] copy of every logit.
    lse_parts = [positive_logit_BP]
    telemetry_counts, hardest = {r: 0.0 for r in MASK_REASONS}, []
    total_columns = 0.0
    telemetry: dict[str, float] = {}
    for source in sources:
        ids_B1N = _per_example(source.ids, batch)
        reasons = {"accidental_hit": ids_B1N == positive_ids_BP[..., None]}
        if history_contains is not None and source is not history_source:
            if settings.mask_history:
                reasons["in_history"] = history_contains(ids_B1N[:, 0])[:, None, :]
            elif history_source is not None:
                reasons["duplicate_of_history"] = history_contains(ids_B1N[:, 0])[:, None, :]
        if source.similarity_masked and not source.per_example:
            reasons["too_similar"] = _column_scores(positive_BPD, source) > settings.similarity_mask_threshold
        masked_BPN = None
        for reason, mask in reasons.items():
            if settings.telemetry:
                new = mask if masked_BPN is None else mask & ~masked_BPN
                telemetry_counts[reason] += int(torch.count_nonzero(new)) * (positions // new.shape[1])
            masked_BPN = mask if masked_BPN is None else masked_BPN | mask
        real_B1N = _per_example(source.valid, batch)  # None: every column is real
        if real_B1N is not None:
            masked_BPN = masked_BPN | ~real_B1N
        num_columns = ids_B1N.numel() if real_B1N is None else int(torch.count_nonzero(real_B1N))
        total_columns += num_columns * positions

        # cos / tau + bonus - log q, built in place on the matmul's own output.
        logit_BPN = _column_scores(query_BPD, source)
        if source.cosine is not None:
            logit_BPN = logit_BPN.clone()
        logit_BPN.div_(tau)
        if source.bonus is not None:
            logit_BPN.add_(source.bonus[:, None, :])
        log_q_B1N = _per_example(source.log_q, batch)
        if settings.logq_correction:
            logit_BPN.sub_(log_q_B1N)
        masked_BPN = masked_BPN.expand_as(logit_BPN)
        if settings.hard_topk is not None and source.hard_mined:
            not_hard = _top_k_mask(logit_BPN.detach(), masked_BPN, settings.hard_topk)
            telemetry_counts["not_hard"] += int(torch.count_nonzero(not_hard))
            masked_BPN = masked_BPN | not_hard
        # A large finite value, not -inf: a source whose every column is masked then has a
        # finite log-sum-exp (with zero weight in the total) and finite gradients.
        logit_BPN = logit_BPN.masked_fill(masked_BPN, _MASKED_LOGIT)
        lse_parts.append(torch.logsumexp(logit_BPN, dim=-1))
        if settings.telemetry:
            logit = logit_BPN.detach()
            if settings.logq_correction:
                logit = logit + log_q_B1N
            if source.bonus is not None:
                logit = logit - source.bonus.detach()[:, None, :]
            if logit.shape[-1]:  # a source without columns (no row has a contact) has no hardest
                hardest.append((logit * tau).masked_fill(masked_BPN, float("-inf")).amax(dim=-1))
            # Mean log q over the real columns (the same for every position P).
            log_q = log_q_B1N.detach()
            if real_B1N is None:
                telemetry[f"logq/{source.name}"] = float(log_q.mean()) if log_q.numel() else 0.0
            else:
                telemetry[f"logq/{source.name}"] = float(torch.where(real_B1N, log_q, 0.0).sum()) / max(num_columns, 1)

    loss_BP = torch.logsumexp(torch.stack(lse_parts, dim=-1), dim=-1) - positive_logit_BP
    weights_BP = torch.ones_like(loss_BP) if valid_BP is None else valid_BP.to(loss_BP.dtype)
    num_valid = weights_BP.sum()
    if settings.count_sum is not None:
        num_valid = settings.count_sum(num_valid)
    num_valid = num_valid.clamp(min=1.0)
    loss = (loss_BP * weights_BP).sum() / num_valid

    if not settings.telemetry:
        return LossOutput(loss=loss)
    for reason, count in telemetry_counts.items():
        telemetry[f"masked_frac/{reason}"] = count / max(total_columns, 1.0)
    valid_mask = weights_BP > 0
    telemetry["sim/positive"] = float(positive_cos_BP.detach()[valid_mask].mean()) if valid_mask.any() else 0.0
    if hardest:
        hardest_BP = torch.stack(hardest, dim=-1).amax(dim=-1)[valid_mask]
        finite = hardest_BP[torch.isfinite(hardest_BP)]
        telemetry["sim/hardest_negative"] = float(finite.mean()) if finite.numel() else 0.0
    if settings.hard_topk is not None:
        telemetry["hard_topk"] = float(settings.hard_topk)
    return LossOutput(loss=loss, telemetry=telemetry)


def contact_order_loss(
    row_U: torch.Tensor,
    logits_U: torch.Tensor,
    target_index_B: torch.Tensor,
    target_found_B: torch.Tensor,
    count_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Softmax cross-entropy of each row's target among that row's contacts alone (the
    repeat side of `model.repeat_explore`), averaged over the rows whose target is one of
    them. `row_U` / `logits_U`: every (row, contact) pair's row and logit; the target's
    pair is `target_index_B` where `target_found_B`. `count_sum` as in LossSettings: each
    rank's share of the global mean (it is called on every rank, rows or not). A batch
    without such a row gives 0, still attached to the logits' graph."""
    batch = target_found_B.shape[0]
    count = target_found_B.sum().to(logits_U.dtype)
    if count_sum is not None:
        count = count_sum(count)
    if not bool(target_found_B.any()):
        return logits_U.sum() * 0.0
    # Per-row log-sum-exp over the row's pairs, shifted by the row's max for stability.
    row_max_B = torch.full((batch,), -math.inf, dtype=logits_U.dtype, device=logits_U.device)
    row_max_B = row_max_B.scatter_reduce(0, row_U, logits_U.detach(), "amax")
    exp_sum_B = torch.zeros(batch, dtype=logits_U.dtype, device=logits_U.device).index_add(
        0, row_U, torch.exp(logits_U - row_max_B[row_U])
    )
    found = target_found_B
    loss_F = row_max_B[found] + torch.log(exp_sum_B[found]) - logits_U[target_index_B[found]]
    return loss_F.sum() / count.clamp(min=1.0)
