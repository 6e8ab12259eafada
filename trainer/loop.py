"""The training loop: `Trainer.train_step / train / test / close`.

The loop never branches on the model or sampler kind; it calls `train_forward`, steps the
dense optimizer (the ID tables' sparse optimizer already ran inside backward) and
validates on a schedule, keeping the best model by validation NDCG@10.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from dataclasses import dataclass

import torch
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from tqdm import tqdm

from configs.schema import ExperimentConfig, OptimConfig
from data.batches import BatchBuilder
from data.loader import TrainLoader
from data.prepare import PreparedData
from models.embeddings import VocabularySizes
from models.retrieval import TwoTowerRetrieval
from models.samplers import identity_gather
from trainer.distributed import Distributed, owned_candidates, shard_model
from trainer.evaluation import full_ranking_ranks, metrics_from_ranks
from trainer.metrics import MetricsLogger
from trainer.results import seen_targets
from trainer.scoring import ModelScorer

log = logging.getLogger(__name__)


def build_model(
    config: ExperimentConfig, prepared: PreparedData, device: torch.device | None = None, dist: Distributed | None = None
) -> TwoTowerRetrieval:
    """The model for `prepared`; with `dist` on several ranks its ID tables are built on
    the meta device (each rank later allocates only its own shards) and its in-batch
    negatives and loss denominators span the ranks."""
    seqs = prepared.seqs
    shared = config.model.shared_id_table
    features = prepared.features
    sizes = VocabularySizes(
        num_targets=seqs.num_targets,
        num_actors=seqs.num_actors,
        num_actions=seqs.num_actions,
        shared_id_table=prepared.log.shared_id_space if shared is None else shared,
        num_feature_tokens=features.num_tokens if features is not None else 0,
    )
    return TwoTowerRetrieval(
        config.model,
        config.loss,
        sizes,
        max_len=config.data.max_len,
        target_log_p=torch.from_numpy(prepared.stats.log_q),
        pool_size=len(prepared.stats.active_pool),
        device=torch.device("meta") if dist is not None and dist.enabled else device,
        gather=dist.gather if dist is not None else identity_gather,
        count_sum=dist.sum if dist is not None and dist.enabled else None,
        target_feature_offsets=torch.from_numpy(features.offsets) if features is not None else None,
        target_feature_tokens=torch.from_numpy(features.tokens) if features is not None else None,
    )


def incoming_inputs(config: ExperimentConfig, prepared: PreparedData, known: str) -> dict:
    """BatchBuilder / ModelScorer arguments for the incoming contacts the repeat re-scorer
    reads (none when it is off or the log has no shared ID space)."""
    if not (config.model.repeat_scoring and config.model.incoming_window > 0):
        return {}
    incoming = prepared.incoming_events(known)
    return {} if incoming is None else {"incoming": incoming, "incoming_window": config.model.incoming_window}


def _sparse_optimizer(config: OptimConfig) -> tuple[type, dict]:
    import torchrec.optim as sparse

    return {
        "rowwise_adagrad": (sparse.RowWiseAdagrad, {"lr": config.sparse_lr}),
        "adagrad": (sparse.Adagrad, {"lr": config.sparse_lr}),
        "adam": (sparse.Adam, {"lr": config.sparse_lr}),
    }[config.sparse_optimizer]


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """Linear warm-up, then cosine or linear decay to min_lr_ratio at total_steps."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.decay == "none":
        return 1.0
    progress = min((step - config.warmup_steps) / max(total_steps - config.warmup_steps, 1), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.decay == "cosine" else 1 - progress
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape


@dataclass
class TrainSummary:
    steps: int
    best_step: int
    best_valid: dict[str, float]
    stopped_early: bool
    train_seconds: float


class Trainer:
    def __init__(
        self, config: ExperimentConfig, prepared: PreparedData, metrics: MetricsLogger, dist: Distributed = Distributed()
    ) -> None:
        self.config, self.prepared, self.metrics, self.dist = config, prepared, metrics, dist
        torch.manual_seed(config.seed)
        if config.train.num_threads:
            torch.set_num_threads(config.train.num_threads)
        if config.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.model = build_model(config, prepared, dist=dist)
        sparse_class, sparse_kwargs = _sparse_optimizer(config.optim)
        apply_optimizer_in_backward(sparse_class, self.model.embeddings.parameters(), sparse_kwargs)
        # On several ranks: ID tables sharded, towers under DDP (trainer/distributed.py).
        self.task = shard_model(self.model, dist, config.distributed)
        dense = {n: p for n, p in self.model.named_parameters() if not n.startswith("embeddings.")}
        self.dense_parameters = list(dense.values())
        repeat = [p for n, p in dense.items() if n.startswith("repeat.")]
        others = [p for n, p in dense.items() if not n.startswith("repeat.")]
        groups = [{"params": others, "base_lr": config.optim.lr}]
        if repeat:
            groups.append({"params": repeat, "base_lr": config.optim.repeat_lr})
        self.optimizer = torch.optim.AdamW(groups, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
        queries = prepared.split.train_queries(prepared.seqs, config.loader.min_history)
        builder = BatchBuilder(
            prepared.seqs, queries, config.history_window, prepared.stats.active_pool, config.loader.num_rand_negs,
            **incoming_inputs(config, prepared, "train"),
        )
        self.loader = TrainLoader(
            builder, batch_size=config.loader.batch_size, seed=config.seed, rank=dist.rank,
            world_size=dist.world_size, num_workers=config.loader.num_workers,
        )
        epoch_steps = self.loader.steps_per_epoch
        self.total_steps = int(math.ceil(config.train.max_epochs * epoch_steps))
        if config.train.max_steps:
            self.total_steps = min(self.total_steps, config.train.max_steps)
        self.eval_every = config.train.eval_every_steps or epoch_steps
        self.step = 0
        self.best_state: dict | None = None

    def train_step(self, batch) -> dict[str, float]:
        factor = lr_factor(self.step, self.total_steps, self.config.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        # Backward from the loss DDP returned (its graph ends in DDP's reduction hook).
        loss, output = self.task(batch.to(self.dist.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.config.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.dense_parameters, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.step += 1
        # On several ranks each loss is this rank's share of the global mean: sum the shares.
        names = [*output.losses, "total"]
        values = self.dist.sum(torch.stack([*output.losses.values(), output.loss]).detach()).tolist()
        scalars = {f"loss/{name}": value for name, value in zip(names, values)}
        scalars["lr"] = self.config.optim.lr * factor
        scalars["grad_norm"] = float(grad_norm)
        scalars.update({f"retrieval/{k}": v for k, v in output.telemetry.items()})
        return scalars

    def evaluate(self, split: str) -> dict[str, float]:
        prepared, config = self.prepared, self.config
        queries = prepared.split.queries(prepared.seqs, split)
        self.model.eval()
        try:
            # On several ranks each scores the candidates whose rows it holds; counts are summed.
            candidates = owned_candidates(self.model, prepared.stats.candidates, self.dist)
            scorer = ModelScorer(
                self.model, prepared.seqs, queries, config.history_window, candidates,
                chunk_size=config.eval.candidate_chunk_size, dist=self.dist, **incoming_inputs(config, prepared, split),
            )
            ranks = full_ranking_ranks(
                scorer,
                prepared.seqs.targets[queries.position],
                candidates,
                query_chunk_size=min(config.eval.query_chunk_size, 256),
                candidate_chunk_size=config.eval.candidate_chunk_size,
                seen=seen_targets(prepared, split) if config.eval.exclude_seen else None,
                count_sum=self.dist.sum if self.dist.world_size > 1 else None,
            )
        finally:
            self.model.train()
        return metrics_from_ranks(ranks)

    def train(self) -> TrainSummary:
        config = self.config
        start = time.perf_counter()
        best_ndcg, best_step, best_valid, evals_without_gain = -1.0, 0, {}, 0
        interactive = sys.stderr.isatty() and self.dist.is_main
        progress = tqdm(total=self.total_steps, disable=not interactive, desc="train", dynamic_ncols=True)
        window_start, window_examples = time.perf_counter(), 0
        stopped_early = False
        self.model.train()
        for batch in self.loader:
            if self.step >= self.total_steps:
                break
            scalars = self.train_step(batch)
            window_examples += batch.batch_size * self.dist.world_size  # the global batch
            progress.update(1)
            if self.step % config.train.log_every_steps == 0 or self.step == 1:
                elapsed = time.perf_counter() - window_start
                scalars["examples_per_s"] = window_examples / max(elapsed, 1e-9)
                window_start, window_examples = time.perf_counter(), 0
                self.metrics.log(scalars, self.step)
                progress.set_postfix(loss=f"{scalars['loss/total']:.3f}", ex_s=f"{scalars['examples_per_s']:.0f}")
                if not interactive:
                    eta = (time.perf_counter() - start) / self.step * (self.total_steps - self.step)
                    log.info(
                        "step %d/%d loss %.4f lr %.2e %.0f examples/s eta %.0fs",
                        self.step, self.total_steps, scalars["loss/total"], scalars["lr"], scalars["examples_per_s"], eta,
                    )
            if self.step % self.eval_every == 0 or self.step == self.total_steps:
                valid = self.evaluate("valid")
                self.metrics.log({f"valid/{k}": v for k, v in valid.items()}, self.step)
                improved = valid["ndcg@10"] > best_ndcg
                log.info(
                    "step %d valid ndcg@10 %.4f hr@10 %.4f%s",
                    self.step, valid["ndcg@10"], valid["hr@10"], " (best)" if improved else "",
                )
                if improved:
                    best_ndcg, best_step, best_valid, evals_without_gain = valid["ndcg@10"], self.step, valid, 0
                    self.best_state = copy.deepcopy(self.model.state_dict())
                else:
                    evals_without_gain += 1
                    if evals_without_gain >= config.train.patience:
                        log.info("early stop: %d validations without a better NDCG@10", evals_without_gain)
                        stopped_early = True
                        break
        progress.close()
        return TrainSummary(self.step, best_step, best_valid, stopped_early, time.perf_counter() - start)

    def test(self) -> dict[str, float]:
        """The test split, evaluated once, at the best model."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return self.evaluate("test")

    def close(self) -> None:
        self.metrics.close()

