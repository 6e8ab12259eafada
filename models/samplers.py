"""Negative sources for the sampled softmax and how their q is estimated.

Every source is a `NegativeSource`: its forward returns `SampledNegatives` (IDs,
embeddings, log q and the flags the loss reads) and, for a sampled source, its own
expected-count function for the step. The loss only subtracts `log_q` and reads the
flags; the source owns what q means. A new source is a new subclass: neither the loss
nor the mixture correction changes. For every source, log q of a column is the log
of its expected number of appearances in that source, so the correction is right
whatever mix of sources is chosen:

- in-batch: the other examples' positives. A target with sampling probability p_j
  appears about B * p_j times in a batch of B, so log q = log(B * p_j). B is the
  global batch when the set is gathered across ranks.
- random: `num_rand_negs` IDs per example drawn uniformly from the active pool by the
  data loader: log q = log(num_rand_negs / |pool|).
- history (repeat scoring): the actor's own past targets, included with certainty:
  log q = log 1 = 0.

With in-batch and random negatives both on, an example's columns are one sample from
both samplers at once, so each column is corrected by its expected count under the two
together, B * p_j + R * u_j (u_j = 1/|pool| for pool members, else 0:
`mixture_log_q`, which asks every sampled source's `log_expected_count` about every
other source's columns; a source's count of its own columns is its log q). Corrected by
each source's own count instead, each source's columns would estimate the whole
partition function, and the softmax would hold it about twice.

p_j comes from the data layer's training frequencies (`static`, q ∝ count^0.75) or from
`StreamingFrequencyEstimator` (Yi et al. 2019), which needs no pass over the data.

Cross-rank gathering is passed in as a callable (`gather`), identity by default, so
this module runs single-process in unit tests; the one all-gather with gradients lives
in `trainer/distributed.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from models.repeat import HistoryItems

Gather = Callable[[torch.Tensor], torch.Tensor]
GatherWithSizes = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Every rank's rows concatenated in rank order, and the [ranks] rows each gave."""


def identity_gather(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass
class SampledNegatives:
    """One negative source. Shared columns have `ids` [N]; per-example columns [B, N].
    The loss treats a source by its flags, never by its name (which only labels its
    telemetry): a new source is a new sampler returning these, the loss untouched. Every
    source's columns that carry the positive's ID (accidental hits) are masked."""

    name: str
    ids: torch.Tensor
    embeddings: torch.Tensor | None  # [N, D] or [B, N, D]; None when `cosine` is given
    log_q: torch.Tensor  # same shape as ids
    valid: torch.Tensor | None = None  # same shape as ids; False marks padding columns
    bonus: torch.Tensor | None = None  # [B, N] added to the logits (repeat scoring)
    cosine: torch.Tensor | None = None
    """[B, N] query-column cosines computed by the caller (one query per example): the
    history source has them from the re-scorer already, per (row, contact) pair, so the
    loss need not gather a padded [B, N, D] block of contact vectors to recompute them."""
    similarity_masked: bool = False
    """Columns more similar to the positive than `loss.similarity_mask_threshold` are
    masked (in-batch: another example's positive may be a near-copy of this one's)."""
    hard_mined: bool = True
    """With hard negatives on, only the source's top-k columns count."""
    certain: bool = False
    """Included with certainty, not sampled (the actor's own contacts): other sources'
    columns that duplicate one of its columns are masked, and the temporal loss, whose
    queries are earlier positions, leaves it out."""
    log_expected_count: Callable[[torch.Tensor], torch.Tensor] | None = None
    """A sampled source's log of how often any ID appears among its columns of this step
    (None for a certain source): the mixture correction asks it about every column."""

    @property
    def per_example(self) -> bool:
        return self.ids.dim() == 2


class NegativeSource(nn.Module):
    """One source of negative columns. Its forward returns them as `SampledNegatives`
    labelled with the source's `name` (telemetry only), with the flags that say how the
    loss treats them and, when sampled, `log_expected_count` for the step. The inputs
    differ by source (the batch's positives, the loader's random IDs, the actor's
    contacts); the output is the interface."""

    name: ClassVar[str]


class StreamingFrequencyEstimator(nn.Module):
    """Streaming estimate of how often each ID appears per training step (Yi et al. 2019,
    "Sampling-bias-corrected neural modeling for large corpus item recommendations").

    IDs hash into `num_buckets` slots holding the step an ID was last seen (A) and an
    exponential moving average of the gap between sightings (B):
        B[h] <- (1 - alpha) * B[h] + alpha * (t - A[h]);   A[h] <- t
    and the expected appearances per step are 1 / B[h]. The arrays are buffers, so the
    estimator is saved and restored with the model's state.
    """

    def __init__(self, num_buckets: int, alpha: float = 0.01, initial_gap: float = 1e6) -> None:
        super().__init__()
        self.num_buckets, self.alpha = num_buckets, alpha
        self.register_buffer("last_seen", torch.full((num_buckets,), -1, dtype=torch.int64))
        self.register_buffer("gap", torch.full((num_buckets,), float(initial_gap), dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def _bucket(self, ids: torch.Tensor) -> torch.Tensor:
        # Multiplicative hashing keeps neighbouring IDs apart when buckets < IDs.
        return torch.remainder(ids * 2654435761, self.num_buckets)

    @torch.no_grad()
    def update(self, ids: torch.Tensor) -> None:
        """Record one step's IDs (each distinct bucket counts once per step)."""
        self.step += 1
        buckets = torch.unique(self._bucket(ids.reshape(-1)))
        seen = self.last_seen[buckets] >= 0
        gap = (self.step - self.last_seen[buckets]).to(torch.float64)
        updated = (1 - self.alpha) * self.gap[buckets] + self.alpha * gap
        # First sighting: the best guess of the gap is the time since the estimator started.
        self.gap[buckets] = torch.where(seen, updated, self.step.to(torch.float64))
        self.last_seen[buckets] = self.step

    def log_expected_count(self, ids: torch.Tensor) -> torch.Tensor:
        """log(expected appearances per step) = -log(gap)."""
        return -torch.log(self.gap[self._bucket(ids)]).to(torch.float32)


@dataclass(frozen=True)
class RowShare:
    """This rank holds rows `first ..` of a per-target array (an even share on several
    ranks), and reads any target's value through every rank: `lookup` gathers every rank's
    IDs, each rank fills the values of the ones it holds (0 elsewhere), a sum over ranks
    gives every value (exactly: one term is not 0) and each rank takes its own back.
    Collective: every rank calls it at the same point of its step."""

    first: int
    rank: int
    gather_varying_with_sizes: GatherWithSizes
    sum: Gather

    def lookup(self, held: torch.Tensor, ids: torch.Tensor, same_on_every_rank: bool = False) -> torch.Tensor:
        """`same_on_every_rank`: every rank asks for the same IDs (the gathered batch's),
        so they need no gathering: one sum over ranks, where other IDs are gathered first."""
        flat = ids.reshape(-1)
        everyone, offset = flat, 0
        if not same_on_every_rank:
            everyone, sizes = self.gather_varying_with_sizes(flat)
            offset = int(sizes[: self.rank].sum())
        index = everyone - self.first
        inside = (index >= 0) & (index < held.numel())
        values = torch.zeros(everyone.shape, dtype=held.dtype, device=held.device)
        values[inside] = held[index[inside]]
        values = self.sum(values)
        return values[offset : offset + flat.numel()].reshape(ids.shape)


class InBatchNegativesSampler(NegativeSource):
    """The (global) batch's positives as negatives for every example.

    `log_p` maps IDs to the log probability of an ID being one example's positive (static
    frequencies), or a `StreamingFrequencyEstimator` gives expected counts per step.
    Columns more similar to the positive than the threshold are masked (another example's
    positive may be a near-copy of this one's).
    """

    name = "in_batch"

    def __init__(
        self,
        log_p: torch.Tensor | None = None,
        estimator: StreamingFrequencyEstimator | None = None,
        gather: Gather = identity_gather,
        log_p_share: RowShare | None = None,
    ) -> None:
        """`log_p_share`: `log_p` holds only these rows of the targets' (several ranks,
        each holding an even share), read through every rank."""
        super().__init__()
        if (log_p is None) == (estimator is None):
            raise ValueError("InBatchNegativesSampler: give exactly one of log_p or estimator")
        self.log_p_share = log_p_share
        if log_p is not None:
            self.register_buffer("log_p", log_p.to(torch.float32), persistent=False)
        else:
            self.log_p = None
        self.estimator = estimator
        self.gather = gather

    def forward(self, positive_ids: torch.Tensor, positive_embeddings: torch.Tensor) -> SampledNegatives:
        ids = self.gather(positive_ids)
        embeddings = self.gather(positive_embeddings)
        if self.estimator is not None and self.training:
            self.estimator.update(ids)
        batch_size = ids.shape[0]
        # The gathered positives are the same on every rank (identity_gather: one rank).
        own = self.log_expected_count(ids, batch_size, same_on_every_rank=True)
        return SampledNegatives(
            self.name, ids, embeddings, own, similarity_masked=True,
            log_expected_count=lambda other: self.log_expected_count(other, batch_size),
        )

    def log_expected_count(self, ids: torch.Tensor, batch_size: int, same_on_every_rank: bool = False) -> torch.Tensor:
        """log of how often each ID appears among a batch of `batch_size` positives.
        Collective when `log_p` is a share (`same_on_every_rank`: see RowShare.lookup)."""
        if self.estimator is not None:
            return self.estimator.log_expected_count(ids)
        if self.log_p_share is None:
            log_p = self.log_p[ids]
        else:
            log_p = self.log_p_share.lookup(self.log_p, ids, same_on_every_rank)
        return log_p + math.log(batch_size)


class RandomNegativesSampler(NegativeSource):
    """Wraps the random IDs the loader drew uniformly from the active pool."""

    name = "random"

    def __init__(self, pool_size: int, in_pool: torch.Tensor | None = None) -> None:
        """`in_pool`: [T] bool, which IDs the pool holds (for `log_expected_count` of IDs
        from elsewhere; not needed when no random negatives are drawn)."""
        super().__init__()
        self.pool_size = pool_size
        if in_pool is not None:
            self.register_buffer("in_pool", in_pool.to(torch.bool), persistent=False)
        else:
            self.in_pool = None

    def log_expected_count(self, ids: torch.Tensor, num: int) -> torch.Tensor:
        """log of how often each ID appears among `num` uniform draws from the pool
        (-inf off the pool)."""
        if self.in_pool is None:
            raise ValueError("RandomNegativesSampler: built without the pool's membership (in_pool)")
        return torch.where(self.in_pool[ids], self._log_count_in_pool(num), float("-inf")).to(torch.float32)

    def _log_count_in_pool(self, num: int) -> float:
        """log of how often one pool member appears among `num` uniform draws."""
        return math.log(max(num, 1) / self.pool_size)

    def forward(self, ids_BR: torch.Tensor, embeddings_BRD: torch.Tensor) -> SampledNegatives:
        """Per-example columns: each example's own R random IDs, with the expected count of R
        draws from the pool."""
        num = ids_BR.shape[1]
        log_q = torch.full(ids_BR.shape, self._log_count_in_pool(num), device=ids_BR.device)
        return SampledNegatives(
            self.name, ids_BR, embeddings_BRD, log_q, log_expected_count=lambda other: self.log_expected_count(other, num)
        )


class ContactNegatives(NegativeSource):
    """The actor's own contacts (its history's targets and, in a shared ID space, the
    senders of its incoming events) as columns of its row, each with the repeat
    re-scorer's bonus. Included with certainty (log q = 0), never hard-mined, and left
    out of the temporal loss; other sources' columns that duplicate them are masked."""

    name = "history"

    def forward(self, contacts: HistoryItems, cosine_U: torch.Tensor, bonus_U: torch.Tensor) -> SampledNegatives:
        """The U (row, contact) pairs with their query cosines and bonuses -> each row's
        contacts as H padded columns (invalid padding, cosine and bonus 0 there)."""
        ids_BH, index_BH, valid_BH = contacts.padded()
        return SampledNegatives(
            self.name,
            ids_BH,
            None,
            torch.zeros(ids_BH.shape, device=ids_BH.device),
            valid=valid_BH,
            bonus=torch.where(valid_BH, bonus_U[index_BH], 0.0),
            cosine=torch.where(valid_BH, cosine_U[index_BH], 0.0),
            hard_mined=False,
            certain=True,
        )


def mixture_log_q(sources: list[SampledNegatives]) -> list[SampledNegatives]:
    """`sources` with every sampled column's log q replaced by the log of its expected
    count under all the sampled sources together, log sum_s E_s[count], each source
    giving its own `log_expected_count`. Certain sources stay as they are; with one
    sampled source its own count already is the mixture's, and nothing changes."""
    counts = [source.log_expected_count for source in sources if source.log_expected_count is not None]
    if len(counts) < 2:
        return sources
    mixed = []
    for source in sources:
        if source.log_expected_count is None:
            mixed.append(source)
            continue
        # A source's own count of its columns is its log q already: not asked again (for
        # in-batch on several ranks the question is a collective lookup of log q).
        per_sampler = torch.stack([
            source.log_q if count is source.log_expected_count else count(source.ids).to(source.log_q.dtype)
            for count in counts
        ])
        mixed.append(dataclasses.replace(source, log_q=torch.logsumexp(per_sampler, dim=0)))
    return mixed
