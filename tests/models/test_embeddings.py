"""The embedding lookup: one collection call, rows in the documented jagged layouts,
features pooled per target, and the encoder's history window."""

from __future__ import annotations

import numpy as np
import torch

from models.embeddings import IdEmbeddings, VocabularySizes
from tests.models.conftest import builder, tiny_sequences


def _lookup_module(seqs, max_len: int = 4, features: bool = True) -> IdEmbeddings:
    # Target t has the feature tokens {t % 3, (t + 1) % 3} but target 0 has none.
    offsets = torch.tensor([0, 0] + [2 * t for t in range(1, seqs.num_targets)])
    tokens = torch.tensor([token for t in range(1, seqs.num_targets) for token in (t % 3, (t + 1) % 3)])
    sizes = VocabularySizes(
        seqs.num_targets, seqs.num_actors, seqs.num_actions, False, num_feature_tokens=3 if features else 0
    )
    return IdEmbeddings(
        sizes, 8, max_len,
        target_feature_offsets=offsets if features else None, target_feature_tokens=tokens if features else None,
    )


def _table(module: IdEmbeddings, name: str) -> torch.Tensor:
    return module.ec.embeddings[name].weight.detach()


def test_a_batch_lookup_hands_over_each_part_in_its_documented_layout():
    seqs = tiny_sequences()
    module = _lookup_module(seqs)
    batch = builder(seqs, max_len=8, num_rand_negs=2).build(np.arange(3), np.random.default_rng(0))
    history = module.encoder_window(batch.history)
    candidates_BC = torch.cat([batch.target[:, None], batch.random_negatives], 1)
    contacts_U, rows_U = torch.tensor([5, 7, 2]), torch.tensor([0, 0, 2])  # example 1 has none
    actor, next_action = batch.query_values("actor"), batch.query_values("next_action")
    with torch.no_grad():
        looked_up = module.lookup_batch(actor, next_action, history, candidates_BC, (contacts_U, rows_U))
    targets, features = _table(module, "target_ids"), _table(module, "target_features")

    def pooled(ids):
        return torch.stack([
            features[[t % 3, (t + 1) % 3]].mean(0) if t else torch.zeros(8) for t in ids.tolist()
        ])

    window = history["history_target"].values()
    torch.testing.assert_close(looked_up.history.target_ND, targets[window])
    torch.testing.assert_close(looked_up.history.feature_ND, pooled(window))
    torch.testing.assert_close(looked_up.history_action_ND, _table(module, "action_types")[history["history_action"].values()])
    # Candidates: example-major, the positive first.
    torch.testing.assert_close(looked_up.candidates.target_ND, targets[candidates_BC.reshape(-1)])
    torch.testing.assert_close(looked_up.candidates.feature_ND, pooled(candidates_BC.reshape(-1)))
    torch.testing.assert_close(looked_up.contacts.target_ND, targets[contacts_U])
    torch.testing.assert_close(looked_up.contacts.feature_ND, pooled(contacts_U))
    torch.testing.assert_close(looked_up.actor_BD, _table(module, "actor_ids")[actor])
    torch.testing.assert_close(looked_up.next_action_BD, _table(module, "action_types")[next_action])
    # Without contacts, none are looked up; without a feature table, no features.
    plain = _lookup_module(seqs, features=False)
    with torch.no_grad():
        bare = plain.lookup_batch(actor, next_action, history, candidates_BC)
    assert bare.contacts is None and bare.candidates.feature_ND is None and bare.history.feature_ND is None
    torch.testing.assert_close(module.lookup_targets(torch.tensor([0, 4])).feature_ND, pooled(torch.tensor([0, 4])))


def test_the_encoder_window_keeps_each_rows_newest_events_in_order():
    seqs = tiny_sequences(length=12)
    module = _lookup_module(seqs, max_len=4)
    batch = builder(seqs, max_len=10).build(np.arange(4), np.random.default_rng(0))
    full, window = batch.history, module.encoder_window(batch.history)
    for key in full.keys():
        lengths, values = full[key].lengths(), full[key].values()
        assert window[key].lengths().tolist() == lengths.clamp(max=4).tolist()
        ends = torch.cumsum(lengths, 0)
        expected = torch.cat([values[end - min(int(n), 4) : end] for end, n in zip(ends.tolist(), lengths)])
        torch.testing.assert_close(window[key].values(), expected)
    # A batch that already fits is passed through as it is.
    short = builder(seqs, max_len=3).build(np.arange(4), np.random.default_rng(0)).history
    assert module.encoder_window(short) is short
