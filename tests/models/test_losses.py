"""Sampled softmax: logQ, masks, hard negatives, curriculum."""

from __future__ import annotations

import math

import pytest
import torch

from models.losses import LossSettings, contact_order_loss, hard_topk_schedule, sampled_softmax_loss
from models.samplers import (
    InBatchNegativesSampler,
    NegativeSource,
    RandomNegativesSampler,
    SampledNegatives,
    mixture_log_q,
)


@pytest.fixture(autouse=True)
def _float64():
    """Exact comparisons in double precision, restored afterwards for other tests."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def _setup(batch=3, vocab=12, dim=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    items = _unit(torch.randn(vocab, dim, generator=gen))
    queries = _unit(torch.randn(batch, dim, generator=gen))
    positives = torch.randint(0, vocab, (batch,), generator=gen)
    return items, queries, positives


def test_every_target_as_negative_with_uniform_q_equals_the_full_softmax():
    items, queries, positives = _setup()
    tau = 0.2
    vocab = items.shape[0]
    # Uniform sampler that includes every target once: expected count 1, log q = 0.
    source = SampledNegatives("random", torch.arange(vocab), items, torch.zeros(vocab))
    out = sampled_softmax_loss(
        queries[:, None], items[positives][:, None], positives[:, None], [source], LossSettings(temperature=tau)
    )
    full = torch.nn.functional.cross_entropy(queries @ items.T / tau, positives)
    torch.testing.assert_close(out.loss, full)


def test_logq_corrected_loss_approaches_the_full_softmax_under_a_skewed_sampler():
    items, queries, positives = _setup(batch=4, vocab=20, seed=1)
    tau, num_samples, draws = 0.25, 400, 300
    gen = torch.Generator().manual_seed(2)
    q = torch.linspace(1.0, 40.0, 20) ** 2  # heavily skewed proposal
    q = q / q.sum()
    full = torch.nn.functional.cross_entropy(queries @ items.T / tau, positives)
    corrected, uncorrected = [], []
    for _ in range(draws):
        ids = torch.multinomial(q, num_samples, replacement=True, generator=gen)
        source = SampledNegatives("random", ids, items[ids], torch.log(num_samples * q[ids]))
        args = (queries[:, None], items[positives][:, None], positives[:, None], [source])
        corrected.append(sampled_softmax_loss(*args, LossSettings(temperature=tau)).loss)
        uncorrected.append(sampled_softmax_loss(*args, LossSettings(temperature=tau, logq_correction=False)).loss)
    corrected_mean, uncorrected_mean = torch.stack(corrected).mean(), torch.stack(uncorrected).mean()
    assert abs(corrected_mean - full) < 0.05 * full
    assert abs(uncorrected_mean - full) > 5 * abs(corrected_mean - full)


def test_in_batch_and_random_negatives_corrected_by_their_mixture_approach_the_full_softmax():
    """Both samplers on: each column's log q is its expected count under both (B p + R u);
    corrected by each source's own count instead, the two sources together estimate the
    partition function about twice."""
    items, queries, positives = _setup(batch=4, vocab=20, seed=3)
    tau, in_batch, num_random, draws = 0.25, 200, 100, 300
    gen = torch.Generator().manual_seed(4)
    p = torch.linspace(1.0, 40.0, 20) ** 2  # a skewed in-batch distribution
    p = p / p.sum()
    pool = torch.arange(5, 20)  # the random negatives' pool leaves 5 items out
    in_pool = torch.zeros(20, dtype=torch.bool)
    in_pool[pool] = True
    random_log_q = math.log(num_random / len(pool))
    counts = [
        lambda ids: torch.log(in_batch * p[ids]),
        lambda ids: torch.where(in_pool[ids], random_log_q, float("-inf")),
    ]
    full = torch.nn.functional.cross_entropy(queries @ items.T / tau, positives)
    mixed_losses, separate_losses = [], []
    for _ in range(draws):
        shared = torch.multinomial(p, in_batch, replacement=True, generator=gen)
        random = pool[torch.randint(len(pool), (len(queries), num_random), generator=gen)]
        sources = [
            SampledNegatives("in_batch", shared, items[shared], counts[0](shared), log_expected_count=counts[0]),
            SampledNegatives(
                "random", random, items[random], torch.full(random.shape, random_log_q), log_expected_count=counts[1]
            ),
        ]
        mixed = mixture_log_q(sources)
        args = (queries[:, None], items[positives][:, None], positives[:, None])
        mixed_losses.append(sampled_softmax_loss(*args, mixed, LossSettings(temperature=tau)).loss)
        separate_losses.append(sampled_softmax_loss(*args, sources, LossSettings(temperature=tau)).loss)
    mixed_mean, separate_mean = torch.stack(mixed_losses).mean(), torch.stack(separate_losses).mean()
    assert abs(mixed_mean - full) < 0.05 * full
    assert abs(separate_mean - full) > 5 * abs(mixed_mean - full)
    # A column off the pool keeps its in-batch count; one in it adds the random draws'.
    off_pool = ~in_pool[shared]
    assert off_pool.any()
    torch.testing.assert_close(mixed[0].log_q[off_pool], counts[0](shared[off_pool]))
    column = random[0, 0]
    torch.testing.assert_close(mixed[1].log_q[0, 0], torch.logaddexp(counts[0](column), torch.tensor(random_log_q)))


class _UniformNegatives(NegativeSource):
    """A fourth source written as a user would: K IDs per example drawn uniformly from
    the whole vocabulary. Nothing in the loss or the mixture knows it."""

    name = "uniform"

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids_BK: torch.Tensor, embeddings_BKD: torch.Tensor) -> SampledNegatives:
        num = ids_BK.shape[1]

        def log_count(ids: torch.Tensor) -> torch.Tensor:
            return torch.full(ids.shape, math.log(num / self.vocab))

        return SampledNegatives(self.name, ids_BK, embeddings_BKD, log_count(ids_BK), log_expected_count=log_count)


def test_a_new_negative_source_joins_the_mixture_without_touching_the_loss():
    """In-batch (skewed), random (a pool) and a new uniform source, each the library's
    own class or a subclass of NegativeSource: the mixture asks every source about every
    column, and the corrected sampled loss approaches the full softmax."""
    items, queries, positives = _setup(batch=4, vocab=20, seed=5)
    tau, draws = 0.25, 300
    gen = torch.Generator().manual_seed(6)
    p = torch.linspace(1.0, 40.0, 20) ** 2
    p = p / p.sum()
    in_pool = torch.zeros(20, dtype=torch.bool)
    in_pool[5:] = True
    in_batch = InBatchNegativesSampler(log_p=torch.log(p))
    random = RandomNegativesSampler(int(in_pool.sum()), in_pool)
    uniform = _UniformNegatives(20)
    full = torch.nn.functional.cross_entropy(queries @ items.T / tau, positives)
    losses = []
    for _ in range(draws):
        shared = torch.multinomial(p, 100, replacement=True, generator=gen)
        pooled = torch.nonzero(in_pool)[:, 0][torch.randint(15, (4, 40), generator=gen)]
        anywhere = torch.randint(20, (4, 30), generator=gen)
        sources = mixture_log_q([
            in_batch(shared, items[shared]), random(pooled, items[pooled]), uniform(anywhere, items[anywhere])
        ])
        args = (queries[:, None], items[positives][:, None], positives[:, None])
        losses.append(sampled_softmax_loss(*args, sources, LossSettings(temperature=tau, telemetry=True)).loss)
    # Column 0 of the uniform source: its count under all three sources together.
    column = anywhere[0, 0]
    expected = torch.logsumexp(torch.stack([
        torch.log(100 * p[column]),
        torch.tensor(math.log(40 / 15) if in_pool[column] else float("-inf")),
        torch.tensor(math.log(30 / 20)),
    ]), 0)
    torch.testing.assert_close(sources[2].log_q[0, 0], expected)
    assert abs(torch.stack(losses).mean() - full) < 0.05 * full


def test_accidental_hits_and_masked_columns_change_neither_loss_nor_gradient():
    items, queries, positives = _setup()
    queries = queries.clone().requires_grad_(True)
    negatives = torch.tensor([(p + 1) % 12 for p in positives.tolist()])
    base = SampledNegatives("in_batch", negatives, items[negatives], torch.zeros(3))
    # Add each example's positive as an extra in-batch column (accidental hit), plus a padding column.
    with_hits_ids = torch.cat([negatives, positives, torch.tensor([7])])
    valid = torch.tensor([True] * 6 + [False])
    with_hits = SampledNegatives("in_batch", with_hits_ids, items[with_hits_ids], torch.zeros(7), valid=valid)
    settings = LossSettings(temperature=0.3, similarity_mask_threshold=2.0)

    def loss_and_grad(source):
        queries.grad = None
        out = sampled_softmax_loss(queries[:, None], items[positives][:, None], positives[:, None], [source], settings)
        out.loss.backward()
        return out.loss.detach(), queries.grad.clone(), out.telemetry

    loss_a, grad_a, _ = loss_and_grad(base)
    loss_b, grad_b, telemetry = loss_and_grad(with_hits)
    # With the hits masked, the only difference is other rows' positives as negatives.
    expected_ids = torch.cat([negatives, positives])
    expected_mask = expected_ids[None, :] == positives[:, None]
    logits = torch.cat([(queries * items[positives]).sum(-1, keepdim=True), queries @ items[expected_ids].T], 1) / 0.3
    logits[:, 1:] = logits[:, 1:].masked_fill(expected_mask, float("-inf"))
    reference = torch.nn.functional.cross_entropy(logits, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(loss_b, reference.detach())
    assert telemetry["masked_frac/accidental_hit"] > 0
    # A column equal to the positive in every row (pure hits) changes nothing at all:
    hits_only = SampledNegatives("random", positives[:, None], items[positives][:, None], torch.zeros(3, 1))
    loss_c, grad_c, _ = loss_and_grad(SampledNegatives("in_batch", negatives, items[negatives], torch.zeros(3)))
    queries.grad = None
    out = sampled_softmax_loss(
        queries[:, None], items[positives][:, None], positives[:, None], [base, hits_only], settings
    )
    out.loss.backward()
    torch.testing.assert_close(out.loss.detach(), loss_c)
    torch.testing.assert_close(queries.grad, grad_c)
    assert torch.isfinite(loss_a) and grad_a.abs().sum() > 0


def test_positive_is_never_masked_even_when_every_negative_is():
    items, queries, positives = _setup()
    source = SampledNegatives("random", positives[:, None], items[positives][:, None], torch.zeros(3, 1))
    out = sampled_softmax_loss(
        queries[:, None], items[positives][:, None], positives[:, None], [source], LossSettings(temperature=0.1)
    )
    torch.testing.assert_close(out.loss, torch.zeros(()))  # softmax over the positive alone


def test_too_similar_negatives_are_masked_in_a_source_flagged_for_it_whatever_its_name():
    items, queries, _ = _setup()
    positives = torch.tensor([0, 1, 2])
    twin = items[positives].clone()  # another ID with the same vector as the positive
    ids = torch.tensor([100, 101, 102])
    for name, flagged in [("in_batch", True), ("a_new_source", True), ("in_batch", False)]:
        source = SampledNegatives(name, ids, twin, torch.zeros(3), similarity_masked=flagged)
        out = sampled_softmax_loss(
            queries[:, None], items[positives][:, None], positives[:, None], [source], LossSettings(temperature=0.1)
        )
        # The diagonal twins, in a flagged source only.
        assert out.telemetry["masked_frac/too_similar"] == pytest.approx(1 / 3 if flagged else 0.0)


def test_hard_negatives_keep_the_highest_scoring_columns_of_each_source():
    items, queries, positives = _setup(batch=2, vocab=30, seed=4)
    ids_a = torch.arange(10, 20)
    ids_b = torch.arange(20, 30)[None].expand(2, -1)
    sources = [
        SampledNegatives("in_batch", ids_a, items[ids_a], torch.zeros(10)),
        SampledNegatives("random", ids_b, items[ids_b], torch.zeros(2, 10)),
    ]
    positives = torch.tensor([0, 1])
    settings = LossSettings(temperature=0.5, hard_topk=3, similarity_mask_threshold=2.0)
    out = sampled_softmax_loss(queries[:, None], items[positives][:, None], positives[:, None], sources, settings)
    # Reference: keep the top 3 of each source by logit.
    logits = [((queries * items[positives]).sum(-1) / 0.5)[:, None]]
    for ids in (ids_a[None].expand(2, -1), ids_b):
        scores = (queries[:, None] * items[ids]).sum(-1) / 0.5
        logits.append(scores.topk(3, dim=-1).values)
    reference = torch.nn.functional.cross_entropy(torch.cat(logits, 1), torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out.loss, reference)
    assert out.telemetry["hard_topk"] == 3
    assert out.telemetry["masked_frac/not_hard"] == pytest.approx(14 / 20)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_curriculum_hits_its_end_points(schedule):
    assert hard_topk_schedule(0, 64, 8, 100, schedule) == 64
    assert hard_topk_schedule(100, 64, 8, 100, schedule) == 8
    assert hard_topk_schedule(1000, 64, 8, 100, schedule) == 8
    middle = hard_topk_schedule(50, 64, 8, 100, schedule)
    assert middle == 36
    values = [hard_topk_schedule(s, 64, 8, 100, schedule) for s in range(101)]
    assert values == sorted(values, reverse=True)


def test_mask_history_masks_negatives_the_actor_already_had():
    items, queries, positives = _setup(batch=2, vocab=12, seed=5)
    positives = torch.tensor([0, 1])
    ids = torch.tensor([5, 6, 7])
    source = SampledNegatives("in_batch", ids, items[ids], torch.zeros(3))
    history = {0: {5}, 1: {6, 7}}

    def contains(ids_BN):
        return torch.tensor([[int(i) in history[b] for i in row] for b, row in enumerate(ids_BN)])

    settings = LossSettings(temperature=0.2, mask_history=True, similarity_mask_threshold=2.0)
    out = sampled_softmax_loss(
        queries[:, None], items[positives][:, None], positives[:, None], [source], settings, history_contains=contains
    )
    assert out.telemetry["masked_frac/in_history"] == pytest.approx(3 / 6)
    logits = torch.cat([(queries * items[positives]).sum(-1, keepdim=True), queries @ items[ids].T], 1) / 0.2
    logits[0, 1] = logits[1, 2] = logits[1, 3] = float("-inf")
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, torch.zeros(2, dtype=torch.long)))


def test_the_contact_order_loss_is_the_cross_entropy_among_each_rows_contacts():
    # Row 0: contacts 0-2, target pair 1.  Row 1: contacts 3-4, its target not a contact.
    # Row 2: no contacts.  Row 3: one contact, the target (loss 0).
    row_U = torch.tensor([0, 0, 0, 1, 1, 3])
    logits_U = torch.tensor([1.0, 3.0, -2.0, 5.0, 0.0, 7.0], requires_grad=True)
    index_B, found_B = torch.tensor([1, 3, 0, 5]), torch.tensor([True, False, False, True])
    loss = contact_order_loss(row_U, logits_U, index_B, found_B)
    by_hand = (torch.nn.functional.cross_entropy(logits_U[:3][None], torch.tensor([1])) + 0.0) / 2
    torch.testing.assert_close(loss, by_hand)
    loss.backward()
    assert logits_U.grad[3:5].abs().sum() == 0  # a row whose target is new teaches the order nothing
    # Large logits stay finite (shifted by each row's max).
    assert torch.isfinite(contact_order_loss(row_U, logits_U.detach() * 1e4, index_B, found_B))
    # On several ranks: this rank's sum over the global count of such rows.
    shared = contact_order_loss(row_U, logits_U.detach(), index_B, found_B, count_sum=lambda count: count * 2)
    torch.testing.assert_close(shared, by_hand / 2)


def test_a_batch_without_a_contact_target_gives_a_zero_order_loss_still_in_the_graph():
    logits_U = torch.tensor([1.0, 2.0], requires_grad=True)
    calls = []
    loss = contact_order_loss(
        torch.tensor([0, 1]), logits_U, torch.tensor([0, 1]), torch.tensor([False, False]),
        count_sum=lambda count: calls.append(count) or count,
    )
    assert loss.item() == 0.0 and calls  # every rank joins the count's sum, rows or not
    loss.backward()
    assert logits_U.grad is not None and logits_U.grad.abs().sum() == 0
