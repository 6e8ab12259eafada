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


def _column_scores(query_BPD: torch.Tensor, source: SampledNegatives) -> torch.Tensor:
    if source.per_example:
        return torch.einsum("bpd,bnd->bpn", query_BPD, source.embeddings)
    return torch.einsum("bpd,nd->bpn", query_BPD, source.embeddings)


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

    history_source = next((s for s in sources if s.name == "history"), None)
    logits, telemetry_counts, hardest = [positive_logit_BP[..., None]], {r: 0.0 for r in MASK_REASONS}, []
    total_columns = 0.0
    telemetry: dict[str, float] = {}
    for source in sources:
        cos_BPN = _column_scores(query_BPD, source)
        ids_B1N = _per_example(source.ids, batch)
        reasons = {"accidental_hit": ids_B1N == positive_ids_BP[..., None]}
        if history_contains is not None and source is not history_source:
            if settings.mask_history:
                reasons["in_history"] = history_contains(ids_B1N[:, 0])[:, None, :]
            elif history_source is not None:
                reasons["duplicate_of_history"] = history_contains(ids_B1N[:, 0])[:, None, :]
        if source.name == "in_batch" and source.embeddings.dim() == 2:
            similarity_BPN = _column_scores(positive_BPD, source)
            reasons["too_similar"] = similarity_BPN > settings.similarity_mask_threshold
        masked_BPN = torch.zeros_like(cos_BPN, dtype=torch.bool)
        for reason, mask in reasons.items():
            mask = mask.expand_as(masked_BPN)
            telemetry_counts[reason] += float((mask & ~masked_BPN).sum())
            masked_BPN = masked_BPN | mask
        padding = _per_example(source.valid, batch)
        real_columns_BPN = torch.ones_like(masked_BPN) if padding is None else padding.expand_as(masked_BPN)
        masked_BPN = masked_BPN | ~real_columns_BPN
        total_columns += float(real_columns_BPN.sum())

        logit_BPN = cos_BPN / tau
        if source.bonus is not None:
            logit_BPN = logit_BPN + source.bonus[:, None, :]
        log_q_B1N = _per_example(source.log_q, batch)
        if settings.logq_correction:
            logit_BPN = logit_BPN - log_q_B1N
        if settings.hard_topk is not None and source.name != "history":
            not_hard = _top_k_mask(logit_BPN.detach(), masked_BPN, settings.hard_topk)
            telemetry_counts["not_hard"] += float(not_hard.sum())
            masked_BPN = masked_BPN | not_hard
        logits.append(logit_BPN.masked_fill(masked_BPN, float("-inf")))
        hardest.append(cos_BPN.detach().masked_fill(masked_BPN, float("-inf")).amax(dim=-1))
        valid_log_q = log_q_B1N.expand_as(masked_BPN)[real_columns_BPN]
        telemetry[f"logq/{source.name}"] = float(valid_log_q.mean()) if valid_log_q.numel() else 0.0

    all_logits_BPC = torch.cat(logits, dim=-1)
    loss_BP = torch.logsumexp(all_logits_BPC, dim=-1) - positive_logit_BP
    weights_BP = torch.ones_like(loss_BP) if valid_BP is None else valid_BP.to(loss_BP.dtype)
    num_valid = weights_BP.sum()
    if settings.count_sum is not None:
        num_valid = settings.count_sum(num_valid)
    num_valid = num_valid.clamp(min=1.0)
    loss = (loss_BP * weights_BP).sum() / num_valid

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

