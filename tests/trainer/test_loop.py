"""Learning-rate schedule, sparse optimizers, gradient clipping."""

from __future__ import annotations

import io
import itertools
import logging
import math
import sys

import numpy as np
import pytest
import torch

from configs.schema import OptimConfig
from models.repeat import CONTACT_OFFSETS
from tests.trainer.smoke import config_trainer, smoke_trainer
import trainer.loop as loop
from trainer.loop import lr_factor
from trainer.scoring import ModelScorer


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_warmup_then_decay_reaches_its_end_points(decay):
    config = OptimConfig(warmup_steps=10, decay=decay, min_lr_ratio=0.1)
    assert lr_factor(0, 100, config) == pytest.approx(0.1)
    assert lr_factor(9, 100, config) == pytest.approx(1.0)
    assert lr_factor(10, 100, config) == pytest.approx(1.0)
    assert lr_factor(100, 100, config) == pytest.approx(0.1)
    values = [lr_factor(s, 100, config) for s in range(10, 101)]
    assert values == sorted(values, reverse=True)


def test_no_decay_keeps_the_rate_after_warmup():
    config = OptimConfig(warmup_steps=0, decay="none")
    assert lr_factor(0, 10, config) == lr_factor(9, 10, config) == 1.0


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adagrad", "adam"])
def test_each_sparse_optimizer_moves_the_id_tables_in_backward(optimizer):
    trainer = smoke_trainer(f"optim.sparse_optimizer={optimizer}")
    tables = {n: p.detach().clone() for n, p in trainer.model.embeddings.named_parameters()}
    scalars = trainer.train_step(next(iter(trainer.loader)))
    assert math.isfinite(scalars["loss/total"])
    moved = [n for n, p in trainer.model.embeddings.named_parameters() if not torch.equal(p.detach(), tables[n])]
    assert moved, f"{optimizer}: no ID table moved"
    # The tables are the fused optimizer's: the dense AdamW never holds them.
    dense = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in dense for p in trainer.model.embeddings.parameters())


def test_the_dense_gradients_are_clipped_to_the_configured_norm():
    trainer = smoke_trainer("optim.grad_clip=0.001")
    scalars = trainer.train_step(next(iter(trainer.loader)))
    clipped = torch.linalg.vector_norm(torch.stack([
        torch.linalg.vector_norm(p.grad) for p in trainer.dense_parameters if p.grad is not None
    ]))
    assert scalars["grad_norm"] > 0.001  # the norm before clipping is what is logged
    assert float(clipped) == pytest.approx(0.001, rel=1e-3)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_is_a_tqdm_bar_on_a_terminal_and_plain_log_lines_otherwise(terminal, monkeypatch, caplog):
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    trainer = smoke_trainer("train.max_steps=8", "train.log_every_steps=4", "train.eval_every_steps=8")
    with caplog.at_level(logging.INFO, logger="trainer"):
        trainer.train()
    plain = [r.getMessage() for r in caplog.records if "examples/s eta" in r.getMessage()]
    bar = stderr.getvalue()
    if terminal:
        assert not plain
        assert "train:" in bar and "8/8" in bar and "ex_s=" in bar and "loss=" in bar
    else:
        assert [line.split()[1] for line in plain] == ["1/8", "4/8", "8/8"]
        assert "train:" not in bar and "ex_s=" not in bar  # no bar (other tests' log handlers may write here)


@pytest.mark.parametrize("name", ["collegemsg", "collegemsg-sasrec", "ml-100k", "ml-100k-sasrec"])
def test_every_shipped_real_data_config_trains_a_step(name):
    # synthetic-scale (1e7 table rows) is run by bench/scale.py, not here.
    trainer = config_trainer(name)
    scalars = trainer.train_step(next(iter(trainer.loader)))
    assert math.isfinite(scalars["loss/total"]) and scalars["grad_norm"] > 0


def test_a_linear_temporal_decay_spans_the_run():
    """The weight reaches 0 at the run's last step, whether the length comes from
    train.max_epochs or train.max_steps (the default decays it); "none" keeps it constant."""
    whole = smoke_trainer()
    assert whole.total_steps > 7 and whole.model.temporal_decay_steps == whole.total_steps
    short = smoke_trainer("train.max_steps=7")
    assert short.total_steps == 7 and short.model.temporal_decay_steps == 7
    assert smoke_trainer("loss.temporal_decay=none").model.temporal_decay_steps == 0


def test_the_contact_offset_is_the_best_on_validation_and_a_tie_keeps_the_one_tried_first(monkeypatch):
    trainer = smoke_trainer()  # on by default
    trainer.model.set_contact_offset(-4.0)  # a stale offset: the model must encode at 0
    ndcg = {0.0: 0.50, 1.0: 0.60, -1.0: 0.10, 2.0: 0.60, -2.0: 0.20, 4.0: 0.55, -4.0: 0.0}
    assert set(ndcg) == set(CONTACT_OFFSETS)
    calls = []

    def ranks_at_shifts(split, shifts):
        calls.append((split, tuple(shifts), trainer.model.repeat.contact_offset.item()))
        return {shift: np.array([shift]) for shift in shifts}

    monkeypatch.setattr(trainer, "query_ranks_at_bonus_shifts", ranks_at_shifts)
    monkeypatch.setattr(loop, "metrics_from_ranks", lambda ranks: {"ndcg@10": ndcg[float(ranks[0])]})
    chosen = trainer.choose_contact_offset()
    assert chosen["chosen"] == 1.0 and trainer.model.repeat.contact_offset.item() == 1.0  # 2.0 ties, tried later
    assert calls == [("valid", CONTACT_OFFSETS, 0.0)]  # one validation pass, every offset
    assert chosen["valid_ndcg@10"] == {str(k): v for k, v in ndcg.items()}


@pytest.mark.parametrize(
    "overrides",
    [["eval.max_held_vectors_gb=0.5"], ["eval.max_held_vectors_gb=0"], ["model.repeat_explore=true"]],
    ids=["vectors held", "vectors computed per block", "repeat_explore"],
)
def test_one_validation_pass_ranks_every_offset_as_the_model_at_that_offset_does(overrides, monkeypatch):
    """The offsets are tried in one pass (the model at 0, the evaluation shifting the
    contacts' bonuses): each offset's ranks equal, bitwise, those of the model set to that
    offset, over several query chunks, with the candidate vectors held or computed per
    block; the queries are encoded and the candidates scored as often as for one offset."""
    trainer = smoke_trainer("eval.query_chunk_size=7", *overrides)
    for batch in itertools.islice(iter(trainer.loader), 20):  # contacts scored apart from the rest
        trainer.train_step(batch)
    trainer.model.set_contact_offset(0.0)
    encode_queries, encoded = trainer.model.encode_queries, []
    trainer.model.encode_queries = lambda *args: encoded.append(len(args[0])) or encode_queries(*args)
    score, scored = ModelScorer.score, []
    monkeypatch.setattr(ModelScorer, "score", lambda self, *args, **kw: scored.append(len(args[1])) or score(self, *args, **kw))
    one_pass = trainer.query_ranks_at_bonus_shifts("valid", CONTACT_OFFSETS)
    one_pass_scored = sum(scored)
    scored.clear()
    trainer.query_ranks("valid")
    assert one_pass_scored == sum(scored)  # one score matrix for the seven offsets, as for one
    monkeypatch.undo()
    del trainer.model.encode_queries
    assert len(one_pass[0.0]) > 7  # several query chunks
    assert sum(encoded) == 2 * len(one_pass[0.0])  # each query encoded once a pass
    for offset in CONTACT_OFFSETS:
        trainer.model.set_contact_offset(offset)
        assert np.array_equal(one_pass[offset], trainer.query_ranks("valid")), f"offset {offset:+g}"
    assert len({one_pass[offset].tobytes() for offset in CONTACT_OFFSETS}) > 1  # the offsets move ranks


def test_shifting_a_model_already_at_an_offset_or_without_contacts_is_refused():
    """The shifts would add to the model's own offset (ranks of offsets never tried), and a
    model without the re-scorer has no bonus to shift."""
    trainer = smoke_trainer()
    trainer.model.set_contact_offset(2.0)
    with pytest.raises(ValueError, match=r"contact offset is \+2; set it to 0 first"):
        trainer.query_ranks_at_bonus_shifts("valid", CONTACT_OFFSETS)
    without = smoke_trainer("model.repeat_scoring=false")
    with pytest.raises(ValueError, match="no contact bonus"):
        without.query_ranks_at_bonus_shifts("valid", CONTACT_OFFSETS)


@pytest.mark.parametrize("overrides", [["model.repeat_scoring=false"], ["model.contact_offset_on_validation=false"]])
def test_no_contact_offset_is_chosen_without_repeat_scoring_or_with_the_option_off(monkeypatch, overrides):
    """The default offset has nothing to act on without the re-scorer: such a config loads
    (a user turning the re-scorer off need not turn the offset off too) and its test
    validates no offset, as with the option off."""
    trainer = smoke_trainer(*overrides)
    splits = []
    monkeypatch.setattr(trainer, "query_ranks_at_bonus_shifts", lambda split, shifts: splits.append(split) or {})
    trainer.prepare_test_model()
    assert trainer.contact_offset is None and splits == []
    assert trainer.model.repeat is None or trainer.model.repeat.contact_offset is None


def test_each_rank_must_fill_a_batch_and_the_error_says_what_to_change():
    from data.readers import DataError

    loop.check_shares_fill_a_batch([300, 256], 256)  # every rank fills one batch: no error
    with pytest.raises(DataError, match="no training examples"):
        loop.check_shares_fill_a_batch([0, 0], 256)
    # A rank holding nothing: a smaller batch would not help, so the error names the rank
    # and says to launch fewer ranks (it used to say "lower loader.batch_size").
    with pytest.raises(DataError, match=r"rank\(s\) \[1\] of 3 hold no training example.*launch fewer ranks") as error:
        loop.check_shares_fill_a_batch([500, 0, 400], 256)
    assert "batch_size" not in str(error.value)
    with pytest.raises(DataError, match="100 training examples in the smallest of the 2 ranks' shares.*lower loader.batch_size"):
        loop.check_shares_fill_a_batch([300, 100], 256)
