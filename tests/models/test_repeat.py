import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from data.activity import ACTIVITY_FEATURES
from data.batches import INCOMING_KEYS, BatchBuilder, BatchSpec
from data.sequences import Queries
from models.repeat import (
    FEATURES_PER_SOURCE,
    HALF_LIVES,
    QUERY_FEATURES,
    ContactEvents,
    contact_keys,
    history_items,
    num_repeat_features,
)

from tests.models.conftest import builder, tiny_model, tiny_sequences

HOUR = 3600


def _items(merged_stream: bool = False):
    # Row 0: history [3, 5, 3], incoming [5, 8] (8 never written to).  Row 1: history [2], no incoming.
    history = ContactEvents(
        torch.tensor([3, 5, 3, 2]), torch.tensor([0, HOUR, 2 * HOUR, 0]), torch.tensor([3, 1])
    )
    incoming = ContactEvents(torch.tensor([5, 8]), torch.tensor([3 * HOUR, 4 * HOUR]), torch.tensor([2, 0]))
    return history_items(
        history, torch.tensor([5 * HOUR, HOUR]), num_targets=10, incoming=incoming, merged_stream=merged_stream
    )


def test_contacts_are_the_union_of_history_targets_and_incoming_senders():
    items = _items()
    assert list(zip(items.row_U.tolist(), items.target_U.tolist())) == [(0, 3), (0, 5), (0, 8), (1, 2)]
    ids, _, valid = items.padded()
    assert ids[0].tolist() == [3, 5, 8] and valid[1].tolist() == [True, False, False]
    assert items.contains(torch.tensor([[8, 2], [2, 8]])).tolist() == [[True, False], [True, False]]


def test_each_source_has_its_own_count_recency_and_presence():
    features = _items().features_UF
    out, inc = features[:, :FEATURES_PER_SOURCE], features[:, FEATURES_PER_SOURCE:]
    present, count, age, hours, newest = 0, 1, 2, 3, 4
    assert out[:, present].tolist() == [1, 1, 0, 1] and inc[:, present].tolist() == [0, 1, 1, 0]
    assert torch.allclose(out[:, count], torch.log1p(torch.tensor([2.0, 1, 0, 1])))
    assert torch.allclose(inc[:, count], torch.log1p(torch.tensor([0.0, 1, 1, 0])))
    # Target 3 was written to last (age 0), 5 one event earlier; 8 came in last.
    assert out[0, newest] == 1 and out[1, newest] == 0 and inc[2, newest] == 1 and inc[1, newest] == 0
    assert torch.allclose(out[:2, age], torch.log1p(torch.tensor([0.0, 1.0])))
    assert torch.allclose(inc[1:3, hours], torch.log1p(torch.tensor([2.0, 1.0])) / 5.0)
    # Absent from a source: older than anything present.
    assert inc[0, hours] > inc[1, hours] and out[2, hours] > out[:2, hours].max()
    decayed = out[:, 6 : 6 + len(HALF_LIVES)]
    assert torch.allclose(decayed[0, 0], torch.tensor(1.0 + 0.5**2))  # ages 0 and 2, half-life 1 event


def test_without_incoming_the_incoming_features_are_zero():
    history = ContactEvents(torch.tensor([3, 5]), torch.tensor([0, HOUR]), torch.tensor([2]))
    items = history_items(history, torch.tensor([2 * HOUR]), num_targets=10)
    assert items.features_UF.shape == (2, 2 * FEATURES_PER_SOURCE)
    assert (items.features_UF[:, FEATURES_PER_SOURCE:] == 0).all()


def test_the_merged_stream_orders_both_directions_in_time():
    """Row 0's merged stream is 3 5 3 5 8 (own, own, own, incoming, incoming): the two-way
    rule's view, where 8 is the newest contact though the actor never wrote to it."""
    plain, items = _items().features_UF, _items(merged_stream=True).features_UF
    assert items.shape == (4, num_repeat_features(True)) and num_repeat_features(True) == 3 * FEATURES_PER_SOURCE
    assert torch.equal(items[:, : 2 * FEATURES_PER_SOURCE], plain)
    merged = items[:, 2 * FEATURES_PER_SOURCE :]
    count, age, newest = 1, 2, 4
    assert torch.allclose(merged[:, count], torch.log1p(torch.tensor([2.0, 2, 1, 1])))
    assert torch.allclose(merged[:, age], torch.log1p(torch.tensor([2.0, 1, 0, 0])))
    assert merged[:, newest].tolist() == [0, 0, 1, 1]
    half_life_1 = merged[:, 6]
    assert torch.allclose(half_life_1, torch.tensor([0.5**4 + 0.5**2, 0.5**3 + 0.5, 1.0, 1.0]))


def test_an_incoming_event_at_the_same_second_is_the_newer():
    history = ContactEvents(torch.tensor([3]), torch.tensor([HOUR]), torch.tensor([1]))
    incoming = ContactEvents(torch.tensor([5]), torch.tensor([HOUR]), torch.tensor([1]))
    items = history_items(history, torch.tensor([2 * HOUR]), 10, incoming, merged_stream=True)
    assert items.features_UF[:, 2 * FEATURES_PER_SOURCE + 4].tolist() == [0, 1]  # target 5 newest


def test_without_incoming_the_merged_stream_is_the_own_one():
    history = ContactEvents(torch.tensor([3, 5, 3]), torch.tensor([0, HOUR, 2 * HOUR]), torch.tensor([3]))
    items = history_items(history, torch.tensor([3 * HOUR]), num_targets=10, merged_stream=True)
    own, merged = items.features_UF[:, :FEATURES_PER_SOURCE], items.features_UF[:, 2 * FEATURES_PER_SOURCE :]
    assert torch.equal(own, merged)


def test_the_actor_idle_time_is_the_same_for_every_pair_of_a_row_and_counts_both_sources():
    # Row 0: own events at 0 h and 1 h, an incoming one at 3 h, query at 5 h -> idle 2 h.
    # Row 1: one own event at 4 h, nothing incoming, query at 4.5 h -> idle 0.5 h.
    history = ContactEvents(torch.tensor([3, 5, 7]), torch.tensor([0, HOUR, 4 * HOUR]), torch.tensor([2, 1]))
    incoming = ContactEvents(torch.tensor([6]), torch.tensor([3 * HOUR]), torch.tensor([1, 0]))
    query = torch.tensor([5 * HOUR, 4 * HOUR + HOUR // 2])
    without = history_items(history, query, 10, incoming, merged_stream=True)
    items = history_items(history, query, 10, incoming, merged_stream=True, actor_idle=True)
    assert items.features_UF.shape[1] == num_repeat_features(True, actor_idle=True) == num_repeat_features(True) + 1
    assert torch.equal(items.features_UF[:, :-1], without.features_UF)  # the other features untouched
    idle = items.features_UF[:, -1]
    expected = {0: np.log1p(2.0) / 5, 1: np.log1p(0.5) / 5}
    assert items.row_U.tolist() == [0, 0, 0, 1]
    assert torch.allclose(idle, torch.tensor([expected[int(r)] for r in items.row_U], dtype=torch.float32))


def test_the_actor_idle_feature_widens_the_rescorer_and_trains():
    seqs = tiny_sequences(num_targets=20)
    torch.manual_seed(0)
    model = tiny_model(seqs, actor_idle_feature=True)
    assert model.repeat.actor_idle
    assert model.repeat.mlp[0].in_features == num_repeat_features(False, actor_idle=True) + 1 + 8
    batch = builder(seqs).build(np.arange(4))
    loss = model.train_forward(batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    idle_column = num_repeat_features(False, actor_idle=True) - 1
    assert model.repeat.mlp[0].weight.grad[:, idle_column].abs().sum() > 0  # the idle time reaches the loss


def _off_and_on(seqs, option: str) -> dict[bool, object]:
    """{False: model, True: model} of a model option, each drawn from the same seed."""
    models = {}
    for value in (False, True):
        torch.manual_seed(0)
        models[value] = tiny_model(seqs, **{option: value})
    return models


def test_the_merged_stream_leaves_models_without_incoming_contacts_bitwise_unchanged():
    """Ratings logs have no incoming events: the option builds the same model (same
    parameters drawn), so their runs stand; where batches carry them, the re-scorer reads
    more."""
    seqs = tiny_sequences(num_targets=20)
    models = _off_and_on(seqs, "merged_contact_stream")
    on, off = models[True].state_dict(), models[False].state_dict()
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)
    torch.manual_seed(0)
    reading = tiny_model(seqs, merged_contact_stream=True, reads_incoming=True)
    assert reading.repeat.merged_stream and not models[True].repeat.merged_stream


def _incoming_kjt(sources: list[list[int]], times: list[list[int]]) -> KeyedJaggedTensor:
    lengths = torch.tensor([len(s) for s in sources] * len(INCOMING_KEYS))
    values = torch.tensor([x for s in sources for x in s] + [t for r in times for t in r], dtype=torch.int64)
    return KeyedJaggedTensor.from_lengths_sync(keys=list(INCOMING_KEYS), values=values, lengths=lengths)


def test_an_incoming_only_contact_gets_a_bonus_and_the_query_vector_is_unchanged():
    seqs = tiny_sequences(num_targets=20)
    model = tiny_model(seqs).eval()
    batch = builder(seqs).build(np.arange(2))
    args = (batch.query_values("actor"), batch.query_values("next_action"), batch.history,
            batch.query_values("next_timestamp"))
    plain = model.encode_queries(*args)
    unseen = [t for t in range(20) if t not in batch.history["history_target"].values().tolist()][0]
    now = int(batch.query_values("next_timestamp").max())
    with_incoming = model.encode_queries(*args, incoming=_incoming_kjt([[unseen], []], [[now - 10], []]))
    assert torch.equal(plain.query_BD, with_incoming.query_BD)
    index, found = with_incoming.history.find(torch.tensor([0, 1]), torch.tensor([unseen, unseen]))
    assert found.tolist() == [True, False]
    assert not plain.history.find(torch.tensor([0]), torch.tensor([unseen]))[1].item()
    assert torch.isfinite(with_incoming.bonus_U).all()
    assert with_incoming.bonus_U.shape[0] == plain.bonus_U.shape[0] + 1


def test_the_encoder_sees_only_the_last_max_len_events():
    seqs = tiny_sequences(length=30)
    model = tiny_model(seqs, max_len=8, repeat_scoring=False).eval()
    long_batch = builder(seqs, max_len=20).build(np.arange(4))
    short_batch = builder(seqs, max_len=8).build(np.arange(4))

    def query(batch):
        return model(batch.query_values("actor"), batch.query_values("next_action"), batch.history,
                     batch.query_values("next_timestamp"))

    assert torch.allclose(query(long_batch), query(short_batch), atol=1e-6)


def test_the_contact_offset_adds_one_logit_to_every_contact_and_nothing_else():
    seqs = tiny_sequences(num_targets=20)
    torch.manual_seed(0)
    model = tiny_model(seqs, contact_offset_on_validation=True).eval()
    batch = builder(seqs).build(np.arange(4))
    args = (batch.query_values("actor"), batch.query_values("next_action"), batch.history,
            batch.query_values("next_timestamp"))
    before = model.encode_queries(*args)
    assert model.repeat.contact_offset.item() == 0.0  # until one is chosen
    model.set_contact_offset(2.5)
    after = model.encode_queries(*args)
    assert torch.equal(before.query_BD, after.query_BD)
    assert torch.allclose(after.bonus_U - before.bonus_U, torch.full_like(before.bonus_U, 2.5))
    assert model.state_dict()["repeat.contact_offset"].item() == 2.5  # checkpoints and the export carry it


def test_without_the_option_the_model_has_no_offset_and_its_parameters_are_unchanged():
    models = _off_and_on(tiny_sequences(num_targets=20), "contact_offset_on_validation")
    off, on = models[False].state_dict(), models[True].state_dict()
    assert set(on) - set(off) == {"repeat.contact_offset"}
    assert all(torch.equal(off[k], on[k]) for k in off)  # the same draws: runs without it stand
    with pytest.raises(ValueError, match="no contact offset"):
        models[False].set_contact_offset(1.0)


def _args(batch):
    return (batch.query_values("actor"), batch.query_values("next_action"), batch.history,
            batch.query_values("next_timestamp"))


def test_repeat_explore_scores_a_contact_by_its_order_and_the_query_propensity_not_its_cosine():
    """score = cos / tau + bonus = (order + propensity) / tau for every contact: the cosine
    is gone, whatever the query vector."""
    seqs = tiny_sequences(num_targets=20)
    model = tiny_model(seqs, repeat_explore=True, contact_offset_on_validation=True).eval()
    batch = builder(seqs).build(np.arange(4))
    model.set_contact_offset(1.5)  # the offset chosen on validation adds to the split score
    encoded = model.encode_queries(*_args(batch))
    items, tau = encoded.history, model.loss_settings.temperature
    vectors_UD = model.candidate_vectors(items.target_U)
    cosine_U = (encoded.query_BD[items.row_U] * vectors_UD).sum(-1)
    action_BD = model.embeddings.lookup_batch(
        batch.query_values("actor"), batch.query_values("next_action"), model.embeddings.encoder_window(batch.history),
        torch.zeros((4, 0), dtype=torch.int64), None,
    ).next_action_BD
    order_U = model.repeat(items, cosine_U, action_BD)
    propensity_B = model.repeat.contact_propensity(items, action_BD)
    torch.testing.assert_close(cosine_U / tau + encoded.bonus_U, (order_U + propensity_B[items.row_U]) / tau + 1.5)
    assert propensity_B.unique().numel() > 1  # one per query, not a constant
    # The propensity reads the row's idle time and counts, one row each.
    assert items.query_features_BQ.shape == (4, QUERY_FEATURES)
    counts = torch.bincount(items.row_U, minlength=4).to(torch.float32)
    torch.testing.assert_close(items.query_features_BQ[:, 1], torch.log1p(counts))
    # Without the option nothing per query is computed on the step's path.
    assert tiny_model(seqs).eval().encode_queries(*_args(batch)).history.query_features_BQ is None


def test_repeat_explore_trains_the_order_by_its_own_loss_and_the_propensity_by_the_main_one():
    seqs = tiny_sequences(num_targets=20)
    model = tiny_model(seqs, repeat_explore=True, loss={"temporal_weight": 0.0})  # the two losses alone
    output = model.train_forward(builder(seqs).build(np.arange(6)))
    assert set(output.losses) == {"main", "contact_order"} and output.losses["contact_order"] > 0
    torch.testing.assert_close(output.loss, output.losses["main"] + output.losses["contact_order"])

    def grads(loss) -> dict[str, torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        return {name: p.grad for name, p in model.named_parameters()}

    main, order = grads(output.losses["main"]), grads(output.losses["contact_order"])

    def moved(grad_of: dict, prefix: str) -> bool:
        return any(g is not None and g.abs().sum() > 0 for n, g in grad_of.items() if n.startswith(prefix))

    assert moved(main, "repeat.propensity.") and not moved(main, "repeat.mlp.")
    assert moved(order, "repeat.mlp.") and not moved(order, "repeat.propensity.")
    # The order reads the cosine detached: its loss leaves the towers and the ID tables of
    # actors and targets to the main loss. It does reach the next action's embedding (the
    # re-scorer's action projection, shared with the propensity, and the action-type
    # table), as the measured runs did (README, "Logs it was not tuned on").
    for part in ("query_tower.", "candidate_tower.", "embeddings.ec.embeddings.target_ids",
                 "embeddings.ec.embeddings.actor_ids"):
        assert not moved(order, part), part
    assert moved(order, "repeat.action.") and moved(order, "embeddings.ec.embeddings.action_types")
    assert moved(main, "query_tower.")


def test_without_repeat_explore_the_parameters_are_drawn_as_before():
    models = _off_and_on(tiny_sequences(num_targets=20), "repeat_explore")
    off, on = models[False].state_dict(), models[True].state_dict()
    assert all(key.startswith("repeat.propensity.") for key in set(on) - set(off)) and set(on) - set(off)
    assert set(off) <= set(on) and all(torch.equal(off[k], on[k]) for k in off)
    assert models[False].repeat.propensity is None


@pytest.mark.parametrize("options", [{}, {"repeat_explore": True}], ids=["default", "repeat_explore"])
def test_a_batch_where_no_row_has_a_contact_trains_and_every_rescorer_weight_gets_a_gradient(options):
    """Every row an actor's first event: no contact anywhere in the batch (it used to fail
    indexing the empty bonus). The re-scorer stays in the graph with zero gradients, as
    DDP's static graph needs every step."""
    seqs = tiny_sequences(num_targets=20)
    first_events = Queries(sequence=np.arange(seqs.num_sequences), position=seqs.offsets[:-1],
                           history_start=seqs.offsets[:-1])
    batch = BatchBuilder(seqs, first_events, BatchSpec(8, 0), np.arange(seqs.num_targets)).build(np.arange(4))
    assert batch.history["history_target"].lengths().sum() == 0
    model = tiny_model(seqs, **options)
    output = model.train_forward(batch)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    for name, parameter in model.repeat.named_parameters():
        assert parameter.grad is not None and not parameter.grad.any(), name


def test_mask_history_without_the_rescorer_trains_and_masks_the_actors_past_targets():
    """loss.mask_history needs the actor's past targets, not the re-scorer: with repeat
    scoring off it used to fail reading the absent re-scorer's settings."""
    seqs = tiny_sequences(num_targets=20)
    model = tiny_model(seqs, repeat_scoring=False, loss={"mask_history": True, "temporal_weight": 0.0})
    output = model.train_forward(builder(seqs).build(np.arange(6)))
    assert torch.isfinite(output.loss)
    assert output.telemetry["masked_frac/in_history"] > 0


def test_contact_keys_are_the_pairs_of_history_items_in_their_order():
    items = _items()
    history = ContactEvents(torch.tensor([3, 5, 3, 2]), torch.tensor([0, HOUR, 2 * HOUR, 0]), torch.tensor([3, 1]))
    incoming = ContactEvents(torch.tensor([5, 8]), torch.tensor([3 * HOUR, 4 * HOUR]), torch.tensor([2, 0]))
    assert torch.equal(contact_keys(history, incoming, 10), items.key_U)
    assert contact_keys(history, None, 10).tolist() == [3, 5, 12]


def test_contact_activity_is_appended_per_pair_and_must_match_the_pairs():
    history = ContactEvents(torch.tensor([3, 5]), torch.tensor([0, HOUR]), torch.tensor([2]))
    activity = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]])
    items = history_items(history, torch.tensor([2 * HOUR]), num_targets=10, activity_UF=activity)
    plain = history_items(history, torch.tensor([2 * HOUR]), num_targets=10)
    assert torch.equal(items.features_UF, torch.cat([plain.features_UF, activity], dim=-1))
    assert items.features_UF.shape[1] == num_repeat_features(False, activity=True)
    with pytest.raises(ValueError, match=r"contact activity of shape \(1, 4\) for 2 contact pairs"):
        history_items(history, torch.tensor([2 * HOUR]), num_targets=10, activity_UF=activity[:1])


def test_a_model_reading_contact_activity_refuses_a_batch_without_it_and_trains_with_it():
    seqs = tiny_sequences(num_targets=20)
    model = tiny_model(seqs, reads_activity=True)
    assert model.repeat.mlp[0].in_features == num_repeat_features(False, activity=True) + 1 + 8
    batch = builder(seqs).build(np.arange(4))
    with pytest.raises(ValueError, match="carries none"):
        model.train_forward(batch)
    # Activity of each (person, time): person + time / 1e6 per column, so the order shows.
    lookup = lambda people, times: (people[:, None] + times[:, None] / 1e6).float().expand(-1, ACTIVITY_FEATURES)
    with_activity = model.with_contact_activity(batch, lookup)
    items = history_items(
        ContactEvents(batch.history["history_target"].values(), batch.history["history_timestamp"].values(),
                      batch.history["history_target"].lengths()),
        batch.query_values("next_timestamp"), num_targets=model.sizes.num_id_rows,
    )
    expected = items.target_U[:, None] + batch.query_values("next_timestamp")[items.row_U, None] / 1e6
    torch.testing.assert_close(with_activity.contact_activity, expected.float().expand(-1, ACTIVITY_FEATURES))
    loss = model.train_forward(with_activity).loss
    loss.backward()
    assert model.repeat.mlp[0].weight.grad[:, -1 - 1 - 8].abs().sum() > 0  # the activity reaches the loss
    assert model.with_contact_activity(batch, None) is batch
