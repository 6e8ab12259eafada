"""The train task: temporal pretraining in one pass, telemetry, and a tiny model that overfits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.layers import Dropout
from models.samplers import mixture_log_q
from models.losses import LossSettings, sampled_softmax_loss
from tests.models.conftest import builder, tiny_model, tiny_sequences


@pytest.mark.parametrize("last_k", [0, 2])
def test_temporal_pretraining_equals_the_per_position_loop(last_k):
    seqs = tiny_sequences()
    model = tiny_model(
        seqs, encoder="hstu", repeat_scoring=False, loss={"temporal_weight": 1.0, "temporal_last_k": last_k}
    ).eval()
    b = builder(seqs, max_len=8, num_rand_negs=3)
    lengths = np.array([6, 1, 3, 8, 2, 5])  # ragged: the flat pairs must follow each row's own length
    b.queries.history_start[:] = b.queries.position - lengths
    batch = b.build(np.arange(6), np.random.default_rng(0))
    with torch.no_grad():
        out = model.train_forward(batch)
        # Per-position reference: for each example and history position j, the query vector
        # of the history truncated after j (causality makes it the same vector), predicting
        # the event at j + 1, against the same negatives.
        looked_up = model.embeddings.lookup_batch(
            batch.query_values("actor"), batch.query_values("next_action"), batch.history,
            torch.cat([batch.target[:, None], batch.random_negatives], 1),
        )
        inputs = model._query_inputs(looked_up, batch.history, batch.query_values("next_timestamp"))
        positions = model.query_tower(inputs, all_positions=True).positions_PD
        candidates = model.candidate_tower(looked_up.candidates.target_ND).reshape(6, 4, -1)
        sources = mixture_log_q(
            [model.in_batch(batch.target, candidates[:, 0]), model.random(batch.random_negatives, candidates[:, 1:])]
        )
        settings = LossSettings(temperature=model.loss_config.temperature)
        history_ids = batch.history["history_target"].values()
        history_vectors = model.candidate_tower(looked_up.history.target_ND)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        losses = []
        for row, (start, length) in enumerate(zip(starts, lengths)):
            for j in range(max(length - 1 - last_k, 0) if last_k else 0, length - 1):
                single = [
                    type(s)(s.name, s.ids if s.ids.dim() == 1 else s.ids[row : row + 1], s.embeddings if s.ids.dim() == 1 else s.embeddings[row : row + 1], s.log_q if s.ids.dim() == 1 else s.log_q[row : row + 1])
                    for s in sources
                ]
                losses.append(
                    sampled_softmax_loss(
                        positions[None, None, start + j], history_vectors[None, None, start + j + 1],
                        history_ids[None, None, start + j + 1], single, settings,
                    ).loss
                )
        assert len(losses) == int(np.minimum(lengths - 1, last_k or 100).sum())
        torch.testing.assert_close(out.losses["temporal"], torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)


def test_train_forward_reports_telemetry_for_every_source_and_reason():
    seqs = tiny_sequences()
    model = tiny_model(seqs, loss={"hard_negatives": {"enabled": True, "topk_start": 4, "topk_end": 2, "num_steps": 10}})
    # (the nested dict above is built into HardNegativesConfig by the conftest helper)
    batch = builder(seqs, num_rand_negs=4).build(np.arange(6), np.random.default_rng(0))
    out = model.train_forward(batch)
    for key in ("logq/in_batch", "logq/random", "logq/history", "masked_frac/accidental_hit", "sim/positive", "sim/hardest_negative", "hard_topk"):
        assert key in out.telemetry, key
    assert set(out.losses) == {"main", "temporal"}
    assert out.telemetry["hard_topk"] == 4
    assert int(model.training_step) == 1


def test_a_tiny_model_overfits_a_tiny_log():
    seqs = tiny_sequences(num_actors=8, length=10, num_targets=15, seed=3)
    model = tiny_model(seqs, max_len=8, encoder="hstu", loss={"temporal_weight": 0.5})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = builder(seqs, max_len=8, num_rand_negs=4).build(np.arange(8), np.random.default_rng(0))
    first = None
    for _ in range(200):
        out = model.train_forward(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        first = first if first is not None else out.losses["main"].item()
    assert first > 1.5
    assert out.losses["main"].item() < 0.1


def test_sparse_target_features_feed_the_candidate_tower():
    seqs = tiny_sequences()
    model = tiny_model(seqs)
    # Rebuild with 3 feature tokens: target t has token t % 3, target 0 has none.
    from models.embeddings import VocabularySizes
    from models.retrieval import TwoTowerRetrieval

    offsets = torch.tensor([0, 0] + list(range(1, seqs.num_targets)))
    tokens = torch.arange(1, seqs.num_targets) % 3
    sizes = VocabularySizes(seqs.num_targets, seqs.num_actors, seqs.num_actions, False, num_feature_tokens=3)
    featured = TwoTowerRetrieval(
        model.model_config, model.loss_config, sizes, max_len=8, target_log_p=torch.zeros(seqs.num_targets),
        pool_size=seqs.num_targets, active_pool_mask=torch.ones(seqs.num_targets, dtype=torch.bool),
        target_feature_offsets=offsets, target_feature_tokens=tokens,
    )
    table = featured.embeddings.ec.embeddings["target_features"].weight
    with torch.no_grad():
        before = featured.candidate_vectors(torch.tensor([0, 1, 4]))
        table[1] += 1.0  # token 1 belongs to targets 1, 4, 7, ...
        after = featured.candidate_vectors(torch.tensor([0, 1, 4]))
    torch.testing.assert_close(before[0], after[0])  # no features: unchanged
    assert not torch.allclose(before[1:], after[1:])
    out = featured.train_forward(builder(seqs, num_rand_negs=2).build(np.arange(6), np.random.default_rng(0)))
    out.loss.backward()
    assert table.grad is not None and table.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "encoder, options", [("hstu", {}), ("transformer", {}), ("hstu", {"repeat_explore": True})],
    ids=["hstu", "transformer", "hstu-repeat_explore"],
)
def test_bf16_towers_run_their_matmuls_in_bf16_and_keep_the_loss_near_fp32(encoder, options):
    """train.precision=bf16: the towers' linear layers compute in bf16 (autocast), their
    output vectors and the loss stay fp32, and loss and gradients stay within bf16 rounding
    of the fp32 step; evaluation (eval mode) is not affected. With `repeat_explore` the
    contact's cosine, subtracted from its score, is the same fp32 one it replaces."""
    seqs = tiny_sequences()
    model = tiny_model(seqs, encoder=encoder, causal=True, **options)
    for module in model.modules():  # dropout on: its bf16 path too (same masks in both runs)
        if isinstance(module, Dropout):
            module.p = 0.1
    batch = builder(seqs, num_rand_negs=4).build(np.arange(6), np.random.default_rng(0))
    linear_dtypes: set[torch.dtype] = set()
    for module in [*model.query_tower.modules(), *model.candidate_tower.modules()]:
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda _m, _i, out: linear_dtypes.add(out.dtype))
    steps = {}
    for bf16 in (False, True):
        model.bf16_towers = bf16
        model.zero_grad()
        linear_dtypes.clear()
        torch.manual_seed(1)
        out = model.train_forward(batch)
        out.loss.backward()
        gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        steps[bf16] = (out.loss.detach(), gradient, set(linear_dtypes))
    (loss32, grad32, dtypes32), (loss16, grad16, dtypes16) = steps[False], steps[True]
    assert dtypes32 == {torch.float32} and dtypes16 == {torch.bfloat16}
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=1e-2, atol=0.0)
    assert ((grad16 - grad32).norm() / grad32.norm()).item() < 5e-2

    # Request-time encoding and evaluation stay fp32, in train mode too.
    linear_dtypes.clear()
    model.candidate_vectors(torch.arange(seqs.num_targets))
    model(batch.query_values("actor"), batch.query_values("next_action"), batch.history)
    assert linear_dtypes == {torch.float32}


def test_a_decayed_temporal_weight_falls_linearly_and_leaves_the_main_loss_at_the_end():
    """loss.temporal_decay = "linear": the total is main + w(step) * temporal with w from
    temporal_weight at step 0 down to 0 at the decay's last step, and 0 after it."""
    seqs = tiny_sequences()
    model = tiny_model(seqs, encoder="hstu", repeat_scoring=False, loss={"temporal_weight": 0.5}).eval()
    batch = builder(seqs, max_len=8, num_rand_negs=3).build(np.arange(6), np.random.default_rng(0))
    model.temporal_decay_steps = 10
    weights = {}
    with torch.no_grad():
        for step in [0, 4, 10, 25]:
            model.training_step.fill_(step)
            out = model.train_forward(batch)
            assert out.losses["temporal"] > 0
            weights[step] = float((out.loss - out.losses["main"]) / out.losses["temporal"])
    assert weights[0] == pytest.approx(0.5, rel=1e-5)
    assert weights[4] == pytest.approx(0.3, rel=1e-5)
    assert weights[10] == 0.0 and weights[25] == 0.0
