"""Building what a run is made of from its config and its prepared data: the model, the
training batches and the evaluation scorer. The trainer, `trainer.predict` and the
benchmarks build them here, so each config fact (the history window, the random pool,
the incoming contacts, the evaluation's memory bounds) is wired in one place.
"""

from __future__ import annotations

import numpy as np
import torch

from configs.schema import ExperimentConfig
from data.activity import ContactActivity
from data.batches import BatchBuilder, BatchSpec
from data.incoming import Incoming
from data.prepare import PreparedData
from data.sequences import Queries
from models.embeddings import VocabularySizes
from models.retrieval import TwoTowerRetrieval
from models.samplers import RowShare, identity_gather
from trainer.distributed import Distributed
from trainer.scoring import ModelScorer


def shared_id_table(config: ExperimentConfig, prepared: PreparedData) -> bool:
    """One ID table for actors and targets: `model.shared_id_table`, or the log's own ID
    space when unset (resolved here only)."""
    shared = config.model.shared_id_table
    return prepared.log.shared_id_space if shared is None else shared


def reads_incoming(config: ExperimentConfig, shared_id_space: bool) -> bool:
    """Whether the re-scorer reads the events that reached each actor (decided here only):
    it is on, its incoming window is not 0, and the log is one ID space."""
    model = config.model
    return model.repeat_scoring and model.incoming_window > 0 and shared_id_space


def reads_activity(config: ExperimentConfig, shared_id_space: bool) -> bool:
    """Whether the re-scorer reads each contact's own recent activity (decided here only):
    `model.contact_activity`, where it reads incoming events (one ID space)."""
    return config.model.contact_activity and reads_incoming(config, shared_id_space)


def batch_spec(config: ExperimentConfig, prepared: PreparedData) -> BatchSpec:
    """What each training batch carries (data/batches.py BatchSpec): the history the
    encoder and the re-scorer need, random negatives, and incoming contacts when the
    re-scorer reads them (a scorer takes the same spec and draws no random negatives)."""
    return BatchSpec(
        history_window=config.history_window,
        num_rand_negs=config.loader.num_rand_negs,
        incoming_window=config.model.incoming_window if reads_incoming(config, prepared.log.shared_id_space) else 0,
    )


def build_model(
    config: ExperimentConfig, prepared: PreparedData, device: torch.device | None = None, dist: Distributed | None = None
) -> TwoTowerRetrieval:
    """The model for `prepared`; with `dist` on several ranks its ID tables are built on
    the meta device (each rank later allocates only its own shards) and its in-batch
    negatives and loss denominators span the ranks."""
    seqs = prepared.seqs
    features = prepared.features
    sizes = VocabularySizes(
        num_targets=seqs.num_targets,
        num_actors=seqs.num_actors,
        num_actions=seqs.num_actions,
        shared_id_table=shared_id_table(config, prepared),
        num_feature_tokens=features.num_tokens if features is not None else 0,
    )
    return TwoTowerRetrieval(
        config.model,
        config.loss,
        sizes,
        max_len=config.data.max_len,
        target_log_p=torch.from_numpy(prepared.stats.log_q),
        pool_size=prepared.stats.pool_size,
        target_log_p_share=_log_p_share(prepared, dist),
        active_pool_mask=_pool_mask(prepared, sizes) if config.loader.num_rand_negs else None,
        device=torch.device("meta") if dist is not None and dist.enabled else device,
        gather=dist.gather if dist is not None else identity_gather,
        count_sum=dist.sum if dist is not None and dist.enabled else None,
        target_feature_offsets=torch.from_numpy(features.offsets) if features is not None else None,
        target_feature_tokens=torch.from_numpy(features.tokens) if features is not None else None,
        bf16_towers=config.train.precision == "bf16",
        reads_incoming=reads_incoming(config, prepared.log.shared_id_space),
        reads_activity=reads_activity(config, prepared.log.shared_id_space),
    )


def _log_p_share(prepared: PreparedData, dist: Distributed | None) -> RowShare | None:
    """How the loss reads log q when the data holds its rows for some targets only (a share
    read for one of several ranks): through every rank."""
    if prepared.target_rows is None:
        return None
    if dist is None or not dist.enabled:
        raise ValueError(f"build_model: the data holds log q of targets {prepared.target_rows} only; give its ranks (dist)")
    return RowShare(prepared.target_rows[0], dist.rank, dist.gather_varying_with_sizes, dist.sum)


def _pool_mask(prepared: PreparedData, sizes: VocabularySizes) -> torch.Tensor:
    """[rows of the target table] bool: the random negatives' pool."""
    mask = np.zeros(sizes.num_id_rows, dtype=bool)
    active = prepared.stats.active  # target index = row: the targets are the table's first rows
    mask[: len(active)] = active
    return torch.from_numpy(mask)


def incoming_events(spec: BatchSpec, prepared: PreparedData, known: str) -> Incoming | None:
    """The incoming events a builder of `spec` reads: those `known` at the queries' time
    ("train", "valid", "test", "all"), or None when the spec carries none."""
    return prepared.incoming_events(known) if spec.incoming_window else None


def contact_activity(
    config: ExperimentConfig, prepared: PreparedData, known: str, dist: Distributed = Distributed()
) -> ContactActivity | None:
    """Each contact's activity from the events `known` at the queries' time ("train",
    "valid", "test", "all"), looked up across `dist`'s ranks, or None when the re-scorer
    does not read it."""
    if not reads_activity(config, prepared.log.shared_id_space):
        return None
    index = prepared.activity(known)
    if dist.world_size == 1:
        return ContactActivity(index, prepared.people_of_rank(0, 1))
    return ContactActivity(
        index, prepared.people_of_rank(dist.rank, dist.world_size), dist.rank, dist.gather_varying_with_sizes, dist.sum
    )


def train_batch_builder(config: ExperimentConfig, prepared: PreparedData, queries: Queries | None = None) -> BatchBuilder:
    """The builder of training batches: `queries` (default: every training example of
    `prepared`) with their history window, random negatives and incoming contacts."""
    if queries is None:
        queries = prepared.split.train_queries(prepared.seqs, config.loader.min_history)
    spec = batch_spec(config, prepared)
    # The pool's IDs only when random negatives are drawn from it (68 MB at 1e7 targets).
    pool = prepared.stats.active_pool if spec.num_rand_negs else np.zeros(0, dtype=np.int64)
    return BatchBuilder(prepared.seqs, queries, spec, pool, incoming=incoming_events(spec, prepared, "train"))


def model_scorer(
    model: TwoTowerRetrieval, config: ExperimentConfig, prepared: PreparedData, queries: Queries,
    candidates: np.ndarray, known: str, dist: Distributed = Distributed(), **options,
) -> ModelScorer:
    """The model as a scorer of `queries` against `candidates`, reading the incoming
    events `known` at the queries' time ("valid", "test", "all"), within the config's
    evaluation bounds (`options` override ModelScorer's arguments)."""
    spec = batch_spec(config, prepared)
    arguments = {
        "query_chunk_size": config.eval.query_chunk_size,
        "max_held_bytes": config.eval.max_held_vectors_gb * 1e9,
        "incoming": incoming_events(spec, prepared, known),
        **options,
    }
    if "activity" not in options:  # a request's data (trainer/predict.py) brings its own
        arguments["activity"] = contact_activity(config, prepared, known, dist)
    return ModelScorer(model, prepared.seqs, queries, spec, candidates, dist=dist, **arguments)
