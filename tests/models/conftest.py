from __future__ import annotations

import numpy as np
import pytest
import torch

from configs.schema import HardNegativesConfig, LossConfig, ModelConfig
from data.batches import BatchBuilder, BatchSpec
from data.sequences import Queries, Sequences
from models.embeddings import VocabularySizes
from models.retrieval import TwoTowerRetrieval


def tiny_sequences(num_actors: int = 6, length: int = 12, num_targets: int = 20, seed: int = 0) -> Sequences:
    rng = np.random.default_rng(seed)
    n = num_actors * length
    return Sequences(
        actor=np.arange(num_actors),
        offsets=np.arange(0, n + 1, length),
        targets=rng.integers(0, num_targets, n),
        actions=rng.integers(0, 3, n).astype(np.int32),
        timestamps=np.sort(rng.integers(1_000_000, 2_000_000, n)),
        num_targets=num_targets,
        num_actors=num_actors,
        num_actions=3,
    )


def tiny_model(seqs: Sequences, max_len: int = 8, **model_overrides) -> TwoTowerRetrieval:
    loss_overrides = model_overrides.pop("loss", {})
    reads_incoming = model_overrides.pop("reads_incoming", False)
    reads_activity = model_overrides.pop("reads_activity", False)
    config = ModelConfig(embedding_dim=16, num_layers=2, num_heads=2, dropout=0.0, **model_overrides)
    hard = loss_overrides.pop("hard_negatives", None)
    loss = LossConfig(**loss_overrides, **({"hard_negatives": HardNegativesConfig(**hard)} if hard else {}))
    sizes = VocabularySizes(seqs.num_targets, seqs.num_actors, seqs.num_actions, shared_id_table=False)
    log_p = torch.full((seqs.num_targets,), -float(np.log(seqs.num_targets)))
    return TwoTowerRetrieval(
        config, loss, sizes, max_len=max_len, target_log_p=log_p, pool_size=seqs.num_targets,
        active_pool_mask=torch.ones(seqs.num_targets, dtype=torch.bool),  # every target in the random pool
        reads_incoming=reads_incoming,
        reads_activity=reads_activity,
    )


def last_event_queries(seqs: Sequences) -> Queries:
    return Queries(
        sequence=np.arange(seqs.num_sequences), position=seqs.offsets[1:] - 1, history_start=seqs.offsets[:-1]
    )


def builder(seqs: Sequences, max_len: int = 8, num_rand_negs: int = 0) -> BatchBuilder:
    return BatchBuilder(seqs, last_event_queries(seqs), BatchSpec(max_len, num_rand_negs), np.arange(seqs.num_targets))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
