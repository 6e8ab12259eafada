"""The training loop: `Trainer.train_step / train / test / close`.

The loop never branches on the model or sampler kind; it calls `train_forward`, steps the
dense optimizer (the ID tables' sparse optimizer already ran inside backward) and
validates on a schedule, keeping the best model by validation NDCG@10.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from configs.loading import config_to_dict
from configs.schema import ExperimentConfig, OptimConfig
from data.dataset import partition_of
from data.loader import Share, TrainLoader
from data.prepare import PreparedData
from data.readers import DataError
from models.repeat import CONTACT_OFFSETS
from trainer.allocators import release_free_heap
from trainer.build import build_model, contact_activity, model_scorer, train_batch_builder
from trainer.checkpoint import (
    CheckpointError, best_name, checkpoint_keys, load_best, load_checkpoint, load_optimizer_state_tensors,
    optimizer_state_tensors, read_metadata, save_best, save_checkpoint,
)
from trainer.distributed import Distributed, owned_candidates, shard_model
from trainer.evaluation import (
    METRIC_NAMES, SeenTargets, full_ranking_ranks, full_ranking_ranks_at_bonus_shifts, metrics_from_ranks,
)
from trainer.metrics import MetricsLogger
from trainer.results import rank_queries, seen_targets
from trainer.table_optimizer import KEY as SPARSE_KEY, SparseOptimizerState, attach_table_optimizer, table_optimizers

log = logging.getLogger(__name__)


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """Linear warm-up, then cosine or linear decay to min_lr_ratio at total_steps."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.decay == "none":
        return 1.0
    progress = min((step - config.warmup_steps) / max(total_steps - config.warmup_steps, 1), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.decay == "cosine" else 1 - progress
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape


class NonFiniteTrainingError(RuntimeError):
    """Too many steps in a row with a NaN or inf loss or gradient."""


DRAWN_KEY = "loader_drawn"
"""The checkpoint's key of the examples drawn this epoch, a partition each (data/loader.py)."""


def _drawn_key(part: int) -> str:
    return f"part{part:05d}"


def _partition_of_rows(rows: np.ndarray, sequence_of_row: np.ndarray, prepared: PreparedData) -> np.ndarray:
    """The partition of each training example `rows` (its actor's): the unit the loader's
    drawn examples are written in, the same whatever the rank count (data/loader.py).
    Built a chunk at a time into the narrowest integers that hold it: it is asked at every
    checkpoint, for every example of the rank's share."""
    of_sequence = partition_of(prepared.seqs.actor, prepared.partitions)
    dtype = np.uint16 if prepared.partitions <= np.iinfo(np.uint16).max else np.int64
    out = np.empty(len(rows), dtype=dtype)
    chunk = 1 << 20
    for lo in range(0, len(rows), chunk):
        out[lo : lo + chunk] = of_sequence[sequence_of_row[rows[lo : lo + chunk]]]
    return out


@dataclass
class TrainSummary:
    steps: int
    best_step: int
    best_valid: dict[str, float]
    stopped_early: bool
    train_seconds: float
    examples_per_s: float
    """Global examples trained per second, validation and checkpoints not counted."""


class Trainer:
    def __init__(
        self,
        config: ExperimentConfig,
        prepared: PreparedData,
        metrics: MetricsLogger,
        dist: Distributed = Distributed(),
        run_dir: Path | None = None,
    ) -> None:
        """`run_dir`: where checkpoints go (`<run_dir>/checkpoints`, at every validation);
        None writes none."""
        self.config, self.prepared, self.metrics, self.dist = config, prepared, metrics, dist
        self.checkpoint_dir = run_dir / "checkpoints" if run_dir is not None and config.train.keep_checkpoints else None
        # The best model so far is a checkpoint of its own there (kept whatever
        # keep_checkpoints says); without a run directory (tests, benchmarks) it is kept in
        # memory instead.
        self.best_dir = run_dir / "checkpoints" if run_dir is not None else None
        torch.manual_seed(config.seed)
        if config.train.num_threads:
            torch.set_num_threads(config.train.num_threads)
        if config.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            # Deterministic mode also fills every new tensor with NaN (to expose reads of
            # uninitialised memory): a write over each large intermediate, measured at a
            # quarter of the HSTU step. Every op here writes its outputs before reading them.
            torch.utils.deterministic.fill_uninitialized_memory = False
        self.model = build_model(config, prepared, dist=dist)
        attach_table_optimizer(self.model, config.optim)
        # On several ranks: ID tables sharded, towers under DDP (trainer/distributed.py).
        self.task = shard_model(self.model, dist, config.distributed)
        towers, repeat = self.model.dense_parameter_groups()
        self.dense_parameters = self.model.dense_parameters()
        groups = [{"params": towers, "base_lr": config.optim.lr}]
        if repeat:
            groups.append({"params": repeat, "base_lr": config.optim.repeat_lr})
        self.optimizer = torch.optim.AdamW(groups, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
        builder = train_batch_builder(config, prepared)
        # Looked up at each step, across ranks: not in the loader's workers.
        self.train_activity = contact_activity(config, prepared, "train", dist)
        queries = builder.queries
        # This rank's share: the examples of its partitions' actors (all of them when the
        # data was read for this rank alone). Every rank runs as many steps as the
        # smallest share fills (data/loader.py).
        rows = np.flatnonzero(prepared.sequences_of_rank(dist.rank, dist.world_size)[queries.sequence])
        batch_size, shares = config.loader.batch_size, dist.gather_objects(len(rows))
        check_shares_fill_a_batch(shares, batch_size)
        self.loader = TrainLoader(
            builder, batch_size=batch_size, seed=config.seed, shares=[Share(dist.rank, rows)],
            epoch_examples=min(shares), num_shares=dist.world_size,
            partition_of_rows=lambda rows: _partition_of_rows(rows, queries.sequence, prepared),
            least_over_ranks=lambda n: min(dist.gather_objects(n)),
            num_workers=config.loader.num_workers,
        )
        epoch_steps = self.loader.steps_per_epoch
        self.total_steps = int(math.ceil(config.train.max_epochs * epoch_steps))
        if config.train.max_steps:
            self.total_steps = min(self.total_steps, config.train.max_steps)
        self.eval_every = config.train.eval_every_steps or epoch_steps
        if config.loss.temporal_decay == "linear":
            self.model.temporal_decay_steps = self.total_steps
        self.step = 0
        # Where training stands, all of it in the checkpoint (see state_dict).
        self.best_ndcg, self.best_step, self.evals_without_gain = -1.0, 0, 0
        self.best_valid: dict[str, float] = {}
        self.best_state: dict | None = None
        self.best_path: Path | None = None  # the best model's checkpoint, once there is one
        self.contact_offset: dict | None = None  # choose_contact_offset's, once tested
        self.nonfinite_steps, self.nonfinite_in_a_row = 0, 0

    def train_step(self, batch) -> dict[str, float]:
        factor = lr_factor(self.step, self.total_steps, self.config.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        # Backward from the loss DDP returned (its graph ends in DDP's reduction hook);
        # telemetry only for the steps whose scalars are logged (see train()).
        batch = self.model.with_contact_activity(batch, self.train_activity)
        loss, output = self.task(batch.to(self.dist.device), telemetry=self._logs_step(self.step + 1))
        self.optimizer.zero_grad(set_to_none=True)
        # Checked before backward: the ID tables update inside backward (fused optimizer),
        # so a NaN loss must never reach it. Every rank skips together (a skipped backward
        # on one rank alone would leave the others waiting in its collectives).
        if self.dist.max(torch.tensor(float(not torch.isfinite(loss).item()))).item() > 0:
            return self._skip_nonfinite_step("loss")
        loss.backward()
        clip = self.config.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.dense_parameters, clip if clip > 0 else float("inf"))
        if not torch.isfinite(grad_norm):  # the norm is of the DDP-reduced gradients: alike on every rank
            # The ID tables have already moved (in backward); only the dense step is skipped.
            return self._skip_nonfinite_step("dense gradient norm")
        self.optimizer.step()
        self.step += 1
        self.nonfinite_in_a_row = 0
        # On several ranks each loss is this rank's share of the global mean: sum the shares.
        names = [*output.losses, "total"]
        values = self.dist.sum(torch.stack([*output.losses.values(), output.loss]).detach()).tolist()
        scalars = {f"loss/{name}": value for name, value in zip(names, values)}
        scalars["lr"] = self.config.optim.lr * factor
        scalars["grad_norm"] = float(grad_norm)
        scalars.update({f"retrieval/{k}": v for k, v in output.telemetry.items()})
        return scalars

    def _logs_step(self, step: int) -> bool:
        return step % self.config.train.log_every_steps == 0 or step == 1

    def _skip_nonfinite_step(self, what: str) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1  # the batch is consumed: a resumed run skips it too
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        limit = self.config.train.max_nonfinite_steps
        log.warning("step %d: non-finite %s; step skipped (%d in a row, stop at %d)",
                    self.step, what, self.nonfinite_in_a_row, limit)
        self.metrics.log({"nonfinite_steps": self.nonfinite_steps}, self.step)
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteTrainingError(
                f"step {self.step}: {self.nonfinite_in_a_row} steps in a row had a non-finite {what}; stopping "
                f"(train.max_nonfinite_steps = {limit}). Lower optim.lr / optim.sparse_lr or raise "
                "loss.temperature; the checkpoints written before are intact"
            )
        return {}

    def evaluate(self, split: str) -> dict[str, float]:
        # From a trimmed heap: the evaluation's temporaries come on top of what is resident.
        self._release_memory()
        return metrics_from_ranks(self.query_ranks(split))

    def _release_memory(self, step: int | None = None) -> None:
        """Hand the heap's free pages back (trainer/allocators.py): at every
        `train.release_memory_every_steps`-th step, or now when no step is given."""
        every = self.config.train.release_memory_every_steps
        if every and (step is None or step % every == 0):
            release_free_heap()

    def query_ranks(self, split: str) -> np.ndarray:
        """[Q] 1-based rank of each query's true target among every candidate, over every
        rank's queries, in the order one process holds them (by actor)."""
        return self._rank(split, full_ranking_ranks)

    def query_ranks_at_bonus_shifts(self, split: str, shifts: Sequence[float]) -> dict[float, np.ndarray]:
        """`query_ranks` with each shift added to every contact's bonus, {shift: [Q] ranks},
        from one pass (trainer/evaluation.py `full_ranking_ranks_at_bonus_shifts`): each
        shift's ranks are bitwise the model's at that contact offset, for one evaluation's
        queries, candidate vectors and score matrix. The model's own contact offset must be
        0, or the shifts would add to it."""
        if self.model.repeat is None:
            raise ValueError("query_ranks_at_bonus_shifts: the model has no contact bonus (model.repeat_scoring is off)")
        offset = self.model.repeat.contact_offset
        if offset is not None and offset.item() != 0.0:
            raise ValueError(
                f"query_ranks_at_bonus_shifts: the model's contact offset is {offset.item():+g}; "
                "set it to 0 first, or the shifts add to it"
            )
        return self._rank(split, functools.partial(full_ranking_ranks_at_bonus_shifts, shifts=shifts))

    def _rank(self, split: str, rank: Callable[..., Any]) -> Any:
        """`rank(scorer, true_targets, candidates, **options)` over this split's queries."""
        prepared, config, dist = self.prepared, self.config, self.dist
        queries = rank_queries(prepared, split, config.eval, dist)
        split_over_ranks = dist.world_size > 1
        self.model.eval()
        try:
            # On several ranks each encodes its own actors' queries, every rank scores every
            # query against the candidates whose rows it holds, and the counts are summed.
            candidates = owned_candidates(self.model, prepared.stats, dist)
            scorer = model_scorer(
                self.model, config, prepared, queries, candidates, split, dist, queries_split_over_ranks=split_over_ranks
            )
            true_targets = prepared.seqs.targets[queries.position]
            seen = seen_targets(prepared, queries) if config.eval.exclude_seen else None
            if split_over_ranks:
                true_targets = scorer.gathered(true_targets)
                if seen is not None:
                    seen = SeenTargets(*scorer.gathered_jagged(np.diff(seen.offsets), seen.targets))
            return rank(
                scorer,
                true_targets,
                candidates,
                query_chunk_size=config.eval.query_chunk_size,
                candidate_chunk_size=config.eval.candidate_chunk_size,
                seen=seen,
                count_sum=dist.sum if split_over_ranks else None,
                score_max=dist.max if split_over_ranks else None,
            )
        finally:
            self.model.train()

    def train(self) -> TrainSummary:
        config = self.config
        start = time.perf_counter()
        interactive = sys.stderr.isatty() and self.dist.is_main
        progress = tqdm(total=self.total_steps, disable=not interactive, desc="train", dynamic_ncols=True)
        window_start, window_examples = time.perf_counter(), 0
        examples, validation_seconds = 0, 0.0  # for the run's training throughput
        stopped_early = False
        self.model.train()
        # On a terminal, log lines (validation, early stop) print above the bar, not through it.
        with logging_redirect_tqdm() if interactive else contextlib.nullcontext():
            for batch in self.loader:
                if self.step >= self.total_steps:
                    break
                scalars = self.train_step(batch)
                validates = self.step % self.eval_every == 0 or self.step == self.total_steps
                if not validates:  # the validation releases it itself
                    self._release_memory(self.step)
                window_examples += batch.batch_size * self.dist.world_size  # the global batch
                examples += batch.batch_size * self.dist.world_size
                progress.update(1)
                if scalars and self._logs_step(self.step):
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
                if validates:
                    validation_start = time.perf_counter()
                    valid = self.evaluate("valid")
                    self.metrics.log({f"valid/{k}": v for k, v in valid.items()}, self.step)
                    improved = valid["ndcg@10"] > self.best_ndcg
                    log.info(
                        "step %d valid ndcg@10 %.4f hr@10 %.4f%s",
                        self.step, valid["ndcg@10"], valid["hr@10"], " (best)" if improved else "",
                    )
                    if improved:
                        self.best_ndcg, self.best_step, self.best_valid = valid["ndcg@10"], self.step, valid
                        self.evals_without_gain = 0
                        self._keep_best()
                    else:
                        self.evals_without_gain += 1
                    if self.checkpoint_dir is not None:
                        save_checkpoint(
                            self.checkpoint_dir, self.step, self.state_dict(), self.dist, config.train.keep_checkpoints,
                            config=config_to_dict(config), best_step=self.best_step if self.best_dir else None,
                        )
                    validation_seconds += time.perf_counter() - validation_start
                    # The throughput window leaves the validation (and checkpoint) out.
                    window_start += time.perf_counter() - validation_start
                    if self.evals_without_gain >= config.train.patience:
                        log.info("early stop: %d validations without a better NDCG@10", self.evals_without_gain)
                        stopped_early = True
                        break
        progress.close()
        seconds = time.perf_counter() - start
        examples_per_s = examples / max(seconds - validation_seconds, 1e-9)
        return TrainSummary(self.step, self.best_step, self.best_valid, stopped_early, seconds, examples_per_s)

    # ------------------------------------------------------------- checkpoints

    def _sparse_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return table_optimizers(self.model, self.task, self.dist)

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue as if uninterrupted, as a DCP state
        dict: tables with their optimizer state, dense parameters and AdamW, the step
        (which fixes the LR schedule and the curriculum, a model buffer), the loader
        position, early-stopping counters (and the best step, whose model is a checkpoint
        of its own beside this one) and this rank's RNG."""
        # One layout whether the tables' optimizer ran fused (torchrun) or not (plain).
        sparse = SparseOptimizerState(self._sparse_optimizers(), fused=self.dist.enabled)
        # Each rank writes its own partitions' drawn examples, read back by whichever rank
        # holds a partition on resume.
        drawn = {_drawn_key(part): torch.from_numpy(bits) for part, bits in self.loader.drawn().items()}
        return {**self._state({SPARSE_KEY: sparse.entries()}), DRAWN_KEY: drawn}

    def _state(self, sparse: dict) -> dict:
        """The checkpoint's state dict, with `sparse`: the tables' optimizer entries."""
        progress = {
            "step": self.step, "best_step": self.best_step, "evals_without_gain": self.evals_without_gain,
            **{f"loader_{key}": value for key, value in self.loader.state_dict().items()},
        }
        state = {
            "model": self.model.state_dict(),
            "dense_optimizer": optimizer_state_tensors(self.model, self.optimizer),
            **sparse,
            "progress": {key: torch.tensor(value, dtype=torch.int64) for key, value in progress.items()},
            "best_ndcg": torch.tensor(self.best_ndcg, dtype=torch.float64),
            "best_valid": {k: torch.tensor(self.best_valid.get(k, math.nan), dtype=torch.float64) for k in METRIC_NAMES},
            f"rng_rank{self.dist.rank}": torch.get_rng_state(),
        }
        return state

    def load_state_dict(self, path: Path) -> None:
        """Continue from checkpoint `path` (written by any number of ranks)."""
        sparse = SparseOptimizerState(self._sparse_optimizers(), fused=self.dist.enabled)
        metadata = checkpoint_keys(path)
        state = self._state(sparse.to_load(metadata, path))
        if "progress.loader_step" in metadata:  # the loader's position in steps, before it was in examples
            for key in self.loader.state_dict():
                del state["progress"][f"loader_{key}"]
            state["progress"]["loader_step"] = torch.tensor(0, dtype=torch.int64)
            state["progress"]["loader_epoch"] = torch.tensor(0, dtype=torch.int64)
        elif "progress.loader_remainder" not in metadata:  # written before remainder epochs were
            del state["progress"]["loader_remainder"]
        rng_key = f"rng_rank{self.dist.rank}"
        if not any(key.startswith(rng_key) for key in metadata):
            # Written by fewer ranks: this rank's random stream starts afresh.
            del state[rng_key]
        load_checkpoint(path, state, self.dist)
        self.model.load_state_dict(state["model"])
        load_optimizer_state_tensors(self.model, self.optimizer, state["dense_optimizer"])
        sparse.loaded()
        progress = {k: int(v) for k, v in state["progress"].items()}
        self.step, self.best_step = progress["step"], progress["best_step"]
        # The best model lies beside the checkpoint that names it.
        self.best_path = path.parent / best_name(self.best_step) if self.best_step else None
        self.evals_without_gain = progress["evals_without_gain"]
        loader = {key.removeprefix("loader_"): value for key, value in progress.items() if key.startswith("loader_")}
        if "step" in loader:  # written in steps of this batch size (which could not change then)
            layout = self.loader.state_dict()
            loader = {**layout, "epoch": loader["epoch"], "examples": loader["step"] * self.loader.batch_size}
        drawn = self._load_drawn(path) if self.loader.needs_drawn(loader) else None
        try:
            self.loader.load_state_dict(loader, drawn)
        except ValueError as e:  # the drawn examples do not fit this data: a refusal in one line
            raise CheckpointError(f"{path}: {e}") from None
        self.best_ndcg = float(state["best_ndcg"])
        best = {k: float(v) for k, v in state["best_valid"].items()}
        self.best_valid = {} if all(math.isnan(v) for v in best.values()) else best
        if rng_key in state:
            torch.set_rng_state(state[rng_key])
        log.info("resumed from %s at step %d", path, self.step)

    def _load_drawn(self, path: Path) -> dict[int, np.ndarray] | None:
        """This rank's partitions' drawn examples from checkpoint `path` (None when it was
        written before they were). A partition it lacks is left out, and one of another
        size is read at its written size: the loader refuses either in one line."""
        stored = read_metadata(path).state_dict_metadata
        if not any(key.startswith(f"{DRAWN_KEY}.") for key in stored):
            return None
        wanted = {}
        for part in self.loader.partition_sizes():
            size = getattr(stored.get(f"{DRAWN_KEY}.{_drawn_key(part)}"), "size", None)
            if isinstance(size, torch.Size) and len(size) == 1:
                wanted[_drawn_key(part)] = torch.empty(size, dtype=torch.uint8)
        state = {DRAWN_KEY: wanted}
        load_checkpoint(path, state, self.dist)
        return {int(key.removeprefix("part")): bits.numpy() for key, bits in state[DRAWN_KEY].items()}

    def _keep_best(self) -> None:
        """The model as the best so far: its own checkpoint (trainer/checkpoint.py
        `save_best`), or an in-memory copy without a run directory."""
        if self.best_dir is not None:
            self.best_path = save_best(self.best_dir, self.step, self.model.state_dict(), self.dist)
        else:
            self.best_state = copy.deepcopy(self.model.state_dict())

    def _restore_best(self) -> None:
        """Load the best model so far into the model (the current one if none was kept)."""
        if self.best_path is not None:
            state = self.model.state_dict()
            load_best(self.best_path, state, self.dist)
            self.model.load_state_dict(state)
        elif self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    def test(self) -> dict[str, float]:
        """The test split, evaluated once, at the model `prepare_test_model` leaves."""
        self.prepare_test_model()
        return self.evaluate("test")

    def prepare_test_model(self) -> None:
        """The model the test scores: the best one (the current one if none was kept), with
        its contact offset chosen on validation under model.contact_offset_on_validation
        (with repeat scoring: without it there is no contact score). Benchmarks that rank
        the test split themselves call it too."""
        self._restore_best()
        if self.config.model.repeat_scoring and self.config.model.contact_offset_on_validation:
            self.contact_offset = self.choose_contact_offset()

    def choose_contact_offset(self) -> dict:
        """Validate the current model at every offset of CONTACT_OFFSETS (on every rank: the
        ranks are summed, so each makes the same choice), keep the best; a tie keeps the
        offset tried first. Returns {"chosen", "valid_ndcg@10": {offset: value}}.

        One validation pass ranks at every offset (`query_ranks_at_bonus_shifts`, the
        model at 0): the queries, the candidate vectors and the score matrix are computed
        once, not once per offset, and only the count is made per offset."""
        self.model.set_contact_offset(0.0)
        self._release_memory()
        ranks = self.query_ranks_at_bonus_shifts("valid", CONTACT_OFFSETS)
        tried = {offset: metrics_from_ranks(ranks[offset])["ndcg@10"] for offset in CONTACT_OFFSETS}
        chosen = max(tried, key=lambda offset: (tried[offset], -CONTACT_OFFSETS.index(offset)))
        self.model.set_contact_offset(chosen)
        log.info(
            "contact offset %+g chosen on validation (NDCG@10 %s)", chosen,
            ", ".join(f"{offset:+g}: {value:.4f}" for offset, value in tried.items()),
        )
        return {"chosen": chosen, "valid_ndcg@10": {str(offset): value for offset, value in tried.items()}}

    def close(self) -> None:
        self.metrics.close()


def check_shares_fill_a_batch(shares: list[int], batch_size: int) -> None:
    """Every rank runs as many steps as the smallest share fills, so each share (the
    training examples of each rank) must fill one batch: else a DataError saying what to
    change (the entry point prints it in one line)."""
    if sum(shares) == 0:
        raise DataError(
            "no training examples: no actor has an event with loader.min_history earlier events "
            "left after the validation and test events are held out; the log is too small"
        )
    if min(shares) == 0:  # a smaller batch cannot help a rank that holds nothing
        empty = [rank for rank, count in enumerate(shares) if count == 0]
        raise DataError(
            f"rank(s) {empty} of {len(shares)} hold no training example: their partitions of the log "
            f"hold no actor with one; launch fewer ranks for a log this small, or raise data.partitions"
        )
    if min(shares) < batch_size:
        where = f" in the smallest of the {len(shares)} ranks' shares" if len(shares) > 1 else ""
        raise DataError(
            f"{min(shares)} training examples{where} cannot fill one global batch of {batch_size} x "
            f"{len(shares)} ranks; lower loader.batch_size"
        )
