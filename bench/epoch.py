"""One training epoch on ml-100k at the published peer's size, through the product's own
training step (trainer/loop.py Trainer.train_step on its TrainLoader's batches).

    .venv/bin/python bench/peak.py && .venv/bin/python bench/epoch.py
    .venv/bin/python bench/epoch.py --quick                 # 2 steps each, extrapolated; nothing written
    .venv/bin/python bench/epoch.py --encoders hstu --steps 100 model.repeat_scoring=false

Sizes (the generative-recommenders reference): embedded:ml-100k, D = 50, 2 layers, 1 head,
history up to 200 (data.max_len), batch 128, 128 random negatives per example
(loader.num_rand_negs) besides the in-batch ones, temporal pretraining on (the product's
default loss.temporal_weight = 0.5, loss.temporal_last_k = 0: every history position
predicts the next event). HSTU: configs/ml-100k.yaml (the product's defaults, repeat
re-scoring over the last 500 events included); transformer: configs/ml-100k-sasrec.yaml
(causal, last-token pooling, no repeat re-scoring). Extra `key=value` arguments override
both.

Two epochs are timed, because the product and the peer mean different things by one:
- `epoch_s`, the product's epoch (what train.max_epochs = 1 costs): its TrainLoader makes
  one example of every training event (97k on ml-100k, 759 steps of 128), each with its
  own history of up to 200 events, and temporal pretraining trains every position of
  every one of those histories: each event is trained up to ~200 times per epoch.
- `sequence_epoch_s`, the peer's epoch: every actor's sequence once (943 actors, 7 steps
  of 128, the last incomplete batch dropped), as one example at the actor's last training
  event whose history (its last 200 training events) is trained at every position by the
  same temporal loss: each event trained once. Same product step, batches built by the
  product's BatchBuilder / TrainLoader over those queries.

Each encoder: a fresh Trainer, `--warmup` untimed steps (reported apart), then the
product's epoch timed (no validation inside), then the model is evaluated once on the
validation and the test split (full ranking; not timed into the epoch; `--no-eval` skips
it, and it is skipped when the epoch was extrapolated) to put a quality figure beside the
time (the peers' test figures on ml-100k: the trainer issue), then the sequence epoch timed.
`--steps N` times at most N steps of each and extrapolates to the epoch (`extrapolated`).

Reference on this kind of machine, 2 threads: the generative-recommenders research code
takes 15.8 s per epoch as published and 4.5 s with its sampled-softmax loss reordered;
the target is at most 3.0 s at equal or better quality.

Writes bench/results/epoch.json: per encoder `epoch_s`, `sequence_epoch_s`, steps, step_ms,
data_wait_frac, examples_per_s, model GFLOP/s and MFU (bench/train.py step_flops),
`epoch_s_at_peak` (the epoch's model FLOPs at the measured peak: a floor no implementation
of that epoch beats), cpu_busy_frac (see bench/train.py), warm-up seconds and the
validation metrics; plus the configs, the peak and the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import peak_gflops, write_result  # noqa: E402
from bench.train import Timing, build_trainer, step_flops, timed_steps  # noqa: E402
from configs.loading import config_to_dict, load_config  # noqa: E402
from configs.schema import ExperimentConfig  # noqa: E402
from data.loader import TrainLoader  # noqa: E402
from data.sequences import Queries  # noqa: E402
from trainer.build import train_batch_builder  # noqa: E402
from trainer.loop import Trainer  # noqa: E402

CONFIGS = {"hstu": ROOT / "configs" / "ml-100k.yaml", "transformer": ROOT / "configs" / "ml-100k-sasrec.yaml"}
PEER = ["data.path=embedded:ml-100k", "data.max_len=200", "model.embedding_dim=50", "model.num_layers=2",
        "model.num_heads=1", "loader.batch_size=128", "loader.num_rand_negs=128", "loss.temporal_last_k=0"]
REFERENCE_S = {"published": 15.8, "loss_reordered": 4.5, "target": 3.0}


def sequence_loader(trainer: Trainer) -> TrainLoader:
    """The peer's epoch: one example per actor, at its last training event (its history,
    the last max_len training events before it, is trained at every position)."""
    config, prepared = trainer.config, trainer.prepared
    queries = prepared.split.train_queries(prepared.seqs, config.loader.min_history)
    last = np.flatnonzero(np.r_[queries.sequence[1:] != queries.sequence[:-1], True]) if len(queries) else []
    per_actor = Queries(sequence=queries.sequence[last], position=queries.position[last],
                        history_start=queries.history_start[last])
    return TrainLoader(train_batch_builder(config, prepared, per_actor), batch_size=config.loader.batch_size, seed=config.seed)


def epoch_figures(config: ExperimentConfig, timing: Timing, epoch_steps: int, peak: float) -> dict:
    timed = len(timing.steps)
    model_flops = sum(sum(step_flops(config, s.shape).values()) for s in timing.steps)
    return {
        "epoch_s": timing.total_s * epoch_steps / timed,
        "extrapolated": timed < epoch_steps,
        "steps_per_epoch": epoch_steps,
        "timed_steps": timed,
        "timed_s": timing.total_s,
        "step_ms": 1e3 * timing.total_s / timed,
        "examples_per_s": timing.examples / timing.total_s,
        "tokens_per_s": timing.tokens / timing.total_s,
        "data_wait_frac": timing.data_s / timing.total_s,
        "padding_frac": 1 - timing.tokens / timing.padded_tokens,
        "gflops": model_flops / timing.total_s / 1e9,
        "mfu": model_flops / timing.total_s / (peak * 1e9),
        # The epoch's model FLOPs at the measured peak: no implementation of this epoch is faster.
        "model_tflop_per_epoch": model_flops / timed * epoch_steps / 1e12,
        "epoch_s_at_peak": model_flops / timed * epoch_steps / (peak * 1e9),
        "cpu_busy_frac": timing.cpu_busy_frac,
    }


def measure(encoder: str, overrides: list[str], steps: int | None, warmup: int, evaluate: bool, peak: float) -> dict:
    config = load_config(CONFIGS[encoder], [*PEER, f"model.encoder={encoder}", *overrides])
    if config.loss.temporal_weight <= 0:
        print(f"warning: {encoder}: loss.temporal_weight = 0, so not every position is trained", file=sys.stderr)
    trainer = build_trainer(config)
    batches = iter(trainer.loader)
    warm = timed_steps(trainer, batches, warmup)
    epoch_steps = trainer.loader.steps_per_epoch
    timing = timed_steps(trainer, batches, epoch_steps if steps is None else min(steps, epoch_steps))
    result = {"encoder": encoder, **epoch_figures(config, timing, epoch_steps, peak),
              "warmup_steps": warmup, "warmup_s": warm.total_s}
    if evaluate and not result["extrapolated"]:  # a quality figure only for a whole trained epoch
        start = time.perf_counter()
        result["valid"] = trainer.evaluate("valid")
        result["eval_s"] = time.perf_counter() - start
        # The test split too, for the quality beside the peers' (../shared/BENCHMARK.md),
        # at the epoch's model (nothing validated inside it, so no other best was kept).
        result["test"] = trainer.test()
    loader = sequence_loader(trainer)
    sequence_steps = loader.steps_per_epoch
    timing = timed_steps(trainer, iter(loader), sequence_steps if steps is None else min(steps, sequence_steps))
    result["sequence_epoch"] = epoch_figures(config, timing, sequence_steps, peak)
    result["sequence_epoch_s"] = result["sequence_epoch"]["epoch_s"]
    result["config"] = config_to_dict(config)
    trainer.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=None,
                        help="time at most this many steps of each epoch and extrapolate (default: whole epochs)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --quick 1)")
    parser.add_argument("--no-eval", action="store_true", help="skip the validation after the epoch")
    parser.add_argument("--quick", action="store_true", help="2 timed steps each, extrapolated, no validation; writes nothing")
    parser.add_argument("overrides", nargs="*", help="config overrides for both encoders")
    args = parser.parse_args()
    steps = args.steps if args.steps is not None else (2 if args.quick else None)
    if steps is not None and steps < 1:
        parser.error("--steps: expected >= 1")
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    evaluate = not (args.no_eval or args.quick)
    peak = peak_gflops("fp32")

    results: dict = {"reference_s": REFERENCE_S, "peak_fp32_gflops": peak, "overrides": args.overrides, "quick": args.quick}
    for encoder in args.encoders:
        results[encoder] = measure(encoder, args.overrides, steps, warmup, evaluate, peak)
        print(f"{encoder}: epoch {results[encoder]['epoch_s']:.1f} s, sequence epoch "
              f"{results[encoder]['sequence_epoch_s']:.1f} s", file=sys.stderr)

    print(
        "| encoder | epoch | epoch s | s at peak | steps | step ms | examples/s | data wait | padding | GFLOP/s | MFU "
        "| CPU busy | valid NDCG@10 | test NDCG@10 | test HR@10 |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for encoder in args.encoders:
        f = results[encoder]
        valid, test = f.get("valid", {}), f.get("test", {})
        for name, e in (("product (every event)", f), ("peer (every actor)", f["sequence_epoch"])):
            nan = float("nan")
            quality = (
                f"{valid.get('ndcg@10', nan):.4f} | {test.get('ndcg@10', nan):.4f} | {test.get('hr@10', nan):.4f}"
                if e is f else " | | "
            )
            print(
                f"| {encoder} | {name} | {e['epoch_s']:.1f}{' (extrapolated)' if e['extrapolated'] else ''} "
                f"| {e['epoch_s_at_peak']:.1f} | {e['steps_per_epoch']} | {e['step_ms']:.0f} | {e['examples_per_s']:.0f} "
                f"| {e['data_wait_frac']:.1%} | {e['padding_frac']:.0%} | {e['gflops']:.1f} | {e['mfu']:.3f} "
                f"| {e['cpu_busy_frac']:.2f} | {quality} |"
            )
    warm = ", ".join(f"{encoder} {results[encoder]['warmup_s']:.1f} s" for encoder in args.encoders)
    print(
        f"warm-up ({warmup} steps, not timed into the epochs): {warm}. Validation after the product's epoch. "
        "'s at peak': the epoch's model FLOPs (bench/train.py step_flops) at the measured fp32 peak, a floor for "
        "any implementation of that epoch. CPU busy: process CPU s / (wall s x torch threads); low = shared cores.\n"
        f"reference (generative-recommenders, 2 threads, every actor once per epoch): {REFERENCE_S['published']} s "
        f"per epoch as published, {REFERENCE_S['loss_reordered']} s with the loss reordered; target <= "
        f"{REFERENCE_S['target']} s"
    )
    if args.quick:
        print("quick run: nothing written")
    else:
        print(f"wrote {write_result('epoch', results)}")


if __name__ == "__main__":
    main()
