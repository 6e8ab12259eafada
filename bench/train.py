"""Training throughput and MFU of the product's own training step (trainer/loop.py
`Trainer.train_step` on batches from its `TrainLoader`), for the HSTU query tower and for
the transformer encoder at the same size.

    .venv/bin/python bench/peak.py && .venv/bin/python bench/train.py
    .venv/bin/python bench/train.py --quick                  # seconds: tiny model, nothing written
    .venv/bin/python bench/train.py --steps 4 --encoders hstu --profile model.repeat_scoring=false

Default workload (the issue's): embedded:ml-100k, D = 256, 4 layers, 4 heads (head dim 64,
as bench/peak.py's attention shape), data.max_len 200, batch 128, every other setting the
product's default (configs/ml-100k.yaml: temporal pretraining on, repeat re-scoring on
over the last model.repeat_window = 500 events, no random negatives); the transformer adds
model.causal=true (temporal pretraining needs it). Extra `key=value` arguments override
both encoders' configs.

Each encoder: a fresh Trainer, `--warmup` steps untimed, then `--steps` timed steps. Data
wait is the time blocked in `next(loader iterator)` (the loader builds batches in the
training process with the default loader.num_workers = 0) over the whole step time
(data + train_step). Real tokens are the history events the encoder attends over (each
row's last data.max_len), without padding.

FLOPs: `step_flops` counts the step's model matmul FLOPs analytically from the batch's
shape: what the model needs for the batch's real tokens (causal attention pairs of real
tokens, every real position through the head and the temporal loss). `mfu` is these per
second of step time (data wait included) over bench/results/peak.json's fp32 peak (its
bf16 peak with `train.precision=bf16`): the figure that does not reward computing padding. After the timed steps one more step runs
under torch.utils.flop_counter's FlopCounterMode (every aten mm / addmm / bmm / baddbmm,
forward and backward): `counted_over_model` = counted / model FLOPs of that batch, the
work the product executes beyond the model's (padding left inside length groups, the
diagonal attention blocks' upper halves, the attention recomputed in backward);
`executed_mfu` = mfu x that ratio. `padding_frac`: padded positions the encoder computes
(models/length_groups.py) over the real ones.

Writes bench/results/train.json (train_bf16.json with train.precision=bf16): per encoder `mfu`, `executed_mfu`, `examples_per_s`,
`tokens_per_s`, `step_ms`, `data_wait_frac`, `padding_frac`, FLOPs per step (model,
executed, by component), `counted_over_model`; plus the configs, the peak used and the machine.
`cpu_busy_frac` = process CPU seconds / (wall seconds x torch threads) over the timed steps:
much lower than on an idle machine means the cores were shared and the figures are low.
`--profile` prints the top ops of one more step (torch.profiler, self CPU time).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import peak_gflops, write_result  # noqa: E402
from configs.loading import config_to_dict, load_config  # noqa: E402
from configs.names import HISTORY_TARGET, INCOMING_SOURCE  # noqa: E402
from configs.schema import ExperimentConfig  # noqa: E402
from data.batches import Batch  # noqa: E402
from data.prepare import PreparedData, prepare  # noqa: E402
from models.repeat import num_repeat_features  # noqa: E402
from trainer.loop import Trainer  # noqa: E402
from trainer.metrics import MetricsLogger  # noqa: E402

BASE_CONFIG = ROOT / "configs" / "ml-100k.yaml"
ENCODERS = ("hstu", "transformer")

# The sizes (bench/peak.py's shapes assume them).
FULL = ["data.path=embedded:ml-100k", "data.max_len=200", "model.embedding_dim=256", "model.num_layers=4",
        "model.num_heads=4", "loader.batch_size=128"]
QUICK = ["data.path=embedded:ml-100k", "data.max_len=20", "model.embedding_dim=32", "model.num_layers=1",
         "model.num_heads=2", "loader.batch_size=16", "model.repeat_window=40"]


def encoder_overrides(encoder: str) -> list[str]:
    """What each encoder needs on top of the shared sizes."""
    return ["model.encoder=hstu"] if encoder == "hstu" else ["model.encoder=transformer", "model.causal=true"]


# --------------------------------------------------------------------------- trainer


def build_trainer(config: ExperimentConfig, prepared: PreparedData | None = None) -> Trainer:
    """The product's Trainer (model, optimizers, TrainLoader), logging nowhere."""
    prepared = prepare(config.data) if prepared is None else prepared
    return Trainer(config, prepared, MetricsLogger(None, enabled=False))


@dataclass
class BatchShape:
    """What the step's FLOPs depend on."""

    lengths: np.ndarray
    """[B] history events each row's encoder attends over (its last data.max_len)."""
    width: int
    """The batch's longest history, capped at max_len (its padded width without length groups)."""
    encoded_tokens: int
    """History positions the encoder computes: rows padded to their length group's width."""
    num_random: int
    contacts: int = 0
    """Distinct (row, target) pairs the repeat re-scorer scores (U); 0 when it is off."""
    contacts_width: int = 0
    """Most contacts of one row (H): the loss pads the history source to it."""
    repeat_features: int = 0
    """Features of each contact the re-scorer reads (models/repeat.num_repeat_features)."""

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


def batch_shape(trainer: Trainer, batch: Batch) -> BatchShape:
    config = trainer.config
    lengths = batch.history[HISTORY_TARGET].lengths()
    encoder = lengths.clamp(max=config.data.max_len).numpy().astype(np.int64)
    width = min(max(int(encoder.max()) if encoder.size else 1, 1), config.data.max_len)
    tower = trainer.model.query_tower
    module = tower.hstu if config.model.encoder == "hstu" else tower.transformer
    encoded = sum(len(g.rows) * g.width for g in module.grouping.groups(torch.from_numpy(encoder)))
    shape = BatchShape(encoder, width, encoded, int(batch.random_negatives.shape[1]))
    if config.model.repeat_scoring:
        # As models/repeat.history_items: distinct (row, target) over the whole carried
        # history (model.repeat_window) plus, in a shared ID space, the incoming senders.
        rows = [torch.repeat_interleave(torch.arange(len(lengths)), lengths)]
        targets = [batch.history[HISTORY_TARGET].values()]
        if batch.incoming is not None:
            source = batch.incoming[INCOMING_SOURCE]
            rows.append(torch.repeat_interleave(torch.arange(len(lengths)), source.lengths()))
            targets.append(source.values())
        target = torch.cat(targets)
        span = int(target.max()) + 1 if target.numel() else 1
        keys = torch.unique(torch.cat(rows) * span + target)
        per_row = torch.bincount(keys // span, minlength=len(lengths))
        shape.contacts, shape.contacts_width = int(keys.numel()), int(per_row.max()) if len(lengths) else 0
        repeat = trainer.model.repeat
        shape.repeat_features = num_repeat_features(repeat.merged_stream, repeat.actor_idle, repeat.activity)
    return shape


# ----------------------------------------------------------------------------- FLOPs


def _mlp(d_in: int, hidden: int, d_out: int, activation: str) -> int:
    """Forward FLOPs per row of models.layers.MLP (SwiGLU's first map is twice as wide)."""
    return 2 * d_in * hidden * (2 if activation == "swiglu" else 1) + 2 * hidden * d_out


def step_flops(config: ExperimentConfig, shape: BatchShape) -> dict[str, float]:
    """Matmul FLOPs of one training step (forward + backward), by component.

    Counted (2 m k n per [m, k] @ [k, n]; backward = 2 x forward, so each grad-carrying
    matmul counts 3 x its forward; the in-batch similarity mask has no backward, 1 x):
    - encoder: HSTU per layer FiLM (actor D -> 2D), U/V/Q/K (D -> 4D) and output (D -> D)
      over T = n + 1 positions (BOS + history), Q K^T and A V (2 D FLOPs per attended pair
      each, all heads together); the time-feature maps (4 -> D). Transformer (width W = 2D)
      per layer QKV (W -> 3W), attention, output (W -> W), feed-forward MLP (W -> 2W -> W)
      over n tokens, and its time map (4 -> W).
    - query_head: HSTU head MLP (D -> 2D -> D); transformer projection (2D -> 2D -> D, or one
      2D -> D map), next-time map (4 -> D) and combine MLP (3D -> 2D -> D); over every
      position with temporal pretraining, else one per row.
    - candidate_tower: item MLP (D -> 2D -> D) over the positive and random negatives of
      each row, the history targets (temporal pretraining) and the contacts (repeat).
    - loss_logits: query x candidate dot products of the sampled softmax: in-batch (B
      columns) and random (R per row) for the main query and for every temporal position;
      the history source (contacts) for the main query.
    - similarity_mask: positive x in-batch similarities (forward only).
    - repeat_scorer: its action map (D -> 8) and MLP over every contact pair.
    Not counted: element-wise work, normalisations, embedding lookups, the optimizer.

    Model FLOPs for the real tokens: causal pairs of real positions (a non-causal
    transformer attends over every real pair).
    """
    model, dim = config.model, config.model.embedding_dim
    batch = shape.batch_size
    real = shape.lengths.astype(np.float64)
    tokens = real
    temporal = config.loss.temporal_weight > 0
    forward: dict[str, float] = {}
    if model.encoder == "hstu":
        positions = tokens + 1  # BOS first
        pairs = positions * (positions + 1) / 2
        per_layer = (
            (2 * dim * 2 * dim * batch if model.film else 0)
            + positions.sum() * (2 * dim * 4 * dim + 2 * dim * dim)
            + 2 * (2 * dim * pairs.sum())
        )
        time_maps = 2 * 4 * dim * (tokens.sum() + positions.sum()) if model.time_features else 0
        forward["encoder"] = model.num_layers * per_layer + time_maps
        head_rows = tokens.sum() if temporal else batch
        forward["query_head"] = head_rows * _mlp(dim, 2 * dim, dim, model.activation)
    else:
        width = 2 * dim
        pairs = tokens * (tokens + 1) / 2 if model.causal else tokens**2
        per_token = 2 * width * 3 * width + 2 * width * width + _mlp(width, 2 * width, width, model.activation)
        per_layer = tokens.sum() * per_token + 2 * (2 * width * pairs.sum())
        time_map = 2 * 4 * width * tokens.sum() if model.time_features else 0
        forward["encoder"] = model.num_layers * per_layer + time_map
        head_rows = tokens.sum() if temporal else batch
        projection = _mlp(2 * dim, 2 * dim, dim, "gelu") if model.history_projection else 2 * 2 * dim * dim
        next_time = 2 * 4 * dim if model.time_features else 0
        forward["query_head"] = head_rows * (projection + next_time + _mlp(3 * dim, 2 * dim, dim, model.activation))

    candidates = batch * (1 + shape.num_random) + (real.sum() if temporal else 0) + shape.contacts
    forward["candidate_tower"] = candidates * _mlp(dim, 2 * dim, dim, model.activation)
    history_columns = shape.contacts
    logits = 2 * dim * (batch * (batch + shape.num_random) + history_columns)
    similarity = 2 * dim * batch * batch
    if temporal:
        # Position j predicts event j + 1: n - 1 real pairs per row (the last temporal_last_k).
        per_row = np.maximum(real - 1, 0)
        if config.loss.temporal_last_k:
            per_row = np.minimum(per_row, config.loss.temporal_last_k)
        temporal_positions = per_row.sum()
        logits += 2 * dim * temporal_positions * (batch + shape.num_random)
        similarity += 2 * dim * temporal_positions * batch
    forward["loss_logits"] = logits
    if model.repeat_scoring:
        hidden = 32  # models/repeat.RepeatScorer
        forward["repeat_scorer"] = 2 * dim * 8 * batch + shape.contacts * (
            2 * (shape.repeat_features + 1 + 8) * hidden + 2 * hidden * hidden + 2 * hidden
        )
    flops = {name: 3.0 * float(value) for name, value in forward.items()}
    flops["similarity_mask"] = float(similarity)
    return flops


def counted_step_flops(trainer: Trainer, batch: Batch) -> float:
    """Matmul FLOPs FlopCounterMode sees in one real train_step (it trains that step)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.train_step(batch)
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------- timing


@dataclass
class StepRecord:
    data_s: float
    step_s: float
    shape: BatchShape
    cpu_s: float = 0.0
    """CPU seconds the process used over the step, all its threads."""


@dataclass
class Timing:
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def data_s(self) -> float:
        return sum(s.data_s for s in self.steps)

    @property
    def total_s(self) -> float:
        return sum(s.data_s + s.step_s for s in self.steps)

    @property
    def cpu_busy_frac(self) -> float:
        """Process CPU seconds / (wall seconds x torch threads): near the same figure on every
        run of an idle machine; much lower when something else takes the cores."""
        return sum(s.cpu_s for s in self.steps) / max(self.total_s * torch.get_num_threads(), 1e-9)

    @property
    def examples(self) -> int:
        return sum(s.shape.batch_size for s in self.steps)

    @property
    def tokens(self) -> int:
        return sum(s.shape.tokens for s in self.steps)

    @property
    def padded_tokens(self) -> int:
        return sum(s.shape.encoded_tokens for s in self.steps)


def timed_steps(trainer: Trainer, batches: Iterator[Batch], steps: int) -> Timing:
    """`steps` product training steps; each split into data wait (next batch) and step."""
    timing = Timing()
    gc.collect()
    for _ in range(steps):
        cpu = time.process_time()
        start = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        trainer.train_step(batch)
        done = time.perf_counter()
        cpu = time.process_time() - cpu
        timing.steps.append(StepRecord(fetched - start, done - fetched, batch_shape(trainer, batch), cpu))
    return timing


def profile_step(trainer: Trainer, batch: Batch, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step(batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50)


# ------------------------------------------------------------------------------ main


def measure(config: ExperimentConfig, warmup: int, steps: int, peak: float, profile: bool) -> dict:
    trainer = build_trainer(config)
    batches = iter(trainer.loader)
    warm = timed_steps(trainer, batches, warmup)
    timing = timed_steps(trainer, batches, steps)
    model_flops = [step_flops(config, s.shape) for s in timing.steps]
    total_model = sum(sum(f.values()) for f in model_flops)
    components = {name: sum(f[name] for f in model_flops) / steps for name in model_flops[0]}

    check_batch = next(batches)
    check_shape = batch_shape(trainer, check_batch)
    counted_over_model = counted_step_flops(trainer, check_batch) / sum(step_flops(config, check_shape).values())
    result = {
        "encoder": config.model.encoder,
        "steps": steps,
        "warmup_steps": warmup,
        "warmup_s": warm.total_s,
        "step_ms": 1e3 * timing.total_s / steps,
        "examples_per_s": timing.examples / timing.total_s,
        "tokens_per_s": timing.tokens / timing.total_s,
        "data_wait_frac": timing.data_s / timing.total_s,
        "mean_history_tokens": timing.tokens / timing.examples,
        "padding_frac": 1 - timing.tokens / timing.padded_tokens,
        "model_gflop_per_step": total_model / steps / 1e9,
        "executed_gflop_per_step": total_model * counted_over_model / steps / 1e9,
        "model_gflop_per_step_by_component": {k: v / 1e9 for k, v in components.items()},
        "gflops": total_model / timing.total_s / 1e9,
        "mfu": total_model / timing.total_s / (peak * 1e9),
        "executed_mfu": total_model * counted_over_model / timing.total_s / (peak * 1e9),
        "counted_over_model": counted_over_model,
        "cpu_busy_frac": timing.cpu_busy_frac,
        "step_s_each": [round(s.data_s + s.step_s, 4) for s in timing.steps],
    }
    if profile:
        result["profile"] = profile_step(trainer, next(batches))
    trainer.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per encoder (default 10; --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; --quick 1)")
    parser.add_argument("--encoders", nargs="+", choices=ENCODERS, default=list(ENCODERS))
    parser.add_argument("--quick", action="store_true", help="tiny model and 2 steps (a smoke run); writes nothing")
    parser.add_argument("--profile", action="store_true", help="print the top ops of one more step per encoder")
    parser.add_argument("overrides", nargs="*", help="config overrides for both, e.g. model.repeat_scoring=false")
    args = parser.parse_args()
    steps = args.steps if args.steps is not None else (2 if args.quick else 10)
    if steps < 1:
        parser.error("--steps: expected >= 1")
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    # train.precision=bf16 (towers under bf16 autocast) is measured against the bf16 peak.
    precision = load_config(BASE_CONFIG, (QUICK if args.quick else FULL) + args.overrides).train.precision
    peak = peak_gflops(precision)

    results: dict = {f"peak_{precision}_gflops": peak, "precision": precision, "quick": args.quick,
                     "overrides": args.overrides, "configs": {}}
    for encoder in args.encoders:
        overrides = (QUICK if args.quick else FULL) + encoder_overrides(encoder) + args.overrides
        config = load_config(BASE_CONFIG, overrides)
        figures = measure(config, warmup, steps, peak, args.profile)
        results[encoder] = figures
        results["configs"][encoder] = config_to_dict(config)
        print(f"{encoder}: {steps} steps, {figures['step_ms'] / 1e3:.2f} s/step", file=sys.stderr)

    print(
        "| encoder | step s | examples/s | real tokens/s | data wait | padding | model GFLOP/step | executed GFLOP/step "
        "| GFLOP/s | MFU | executed MFU | counted / model |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for encoder in args.encoders:
        f = results[encoder]
        print(
            f"| {encoder} | {f['step_ms'] / 1e3:.2f} | {f['examples_per_s']:.1f} | {f['tokens_per_s']:.0f} "
            f"| {f['data_wait_frac']:.1%} | {f['padding_frac']:.0%} | {f['model_gflop_per_step']:.1f} "
            f"| {f['executed_gflop_per_step']:.1f} | {f['gflops']:.1f} | {f['mfu']:.3f} | {f['executed_mfu']:.3f} "
            f"| {f['counted_over_model']:.3f} |"
        )
    for encoder in args.encoders:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in results[encoder]["model_gflop_per_step_by_component"].items())
        print(f"{encoder} model GFLOP per step by component: {parts}")
        if "profile" in results[encoder]:
            print(f"\n{encoder}: top ops of one step (self CPU time)\n{results[encoder]['profile']}")
    busy = ", ".join(f"{encoder} {results[encoder]['cpu_busy_frac']:.2f}" for encoder in args.encoders)
    print(f"MFU against the measured {precision} peak {peak:.1f} GFLOP/s (bench/results/peak.json); CPU busy "
          f"(process CPU s / wall s x {torch.get_num_threads()} threads; low = the cores were shared): {busy}")
    if args.quick:
        print("quick run: nothing written")
    else:
        # The fp32 figures (the issue's) stay in train.json whatever else is measured.
        print(f"wrote {write_result('train' if precision == 'fp32' else f'train_{precision}', results)}")


if __name__ == "__main__":
    main()
