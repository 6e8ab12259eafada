"""Time per real history token as histories get longer: the same number of real tokens
spread over histories of at most 50, 200 and 1000 events, through the product's own
training step (trainer/loop.py Trainer.train_step on batches from data/loader.py's
TrainLoader and data/batches.py's BatchBuilder).

    .venv/bin/python bench/seq_len.py
    .venv/bin/python bench/seq_len.py --quick              # seconds: tiny model, nothing written
    .venv/bin/python bench/seq_len.py --lengths 50 200 --total-tokens 8192

Workload: one synthetic log from the product's generator (data/synthetic.py, `synthetic:`
spec; power-law actor activity, so history lengths are heavy-tailed as in real logs:
sequence length median ~70, p99 ~500, max ~5,400 events). For each max length m the
training examples are the product's own (every training event, history = the actor's
last m earlier events), a fixed random subset of them holding `--total-tokens` real
history tokens. Batches hold about the same number of real tokens at every m
(`--tokens-per-batch`): batch size = tokens per batch / the mean history length at m, so
per-step costs that do not grow with tokens weigh the same in all three. The model is
bench/train.py's (HSTU, D = 256, 4 layers, 4 heads, temporal pretraining on, the product's
defaults otherwise), with model.repeat_window=0 so the repeat re-scorer reads the same m
events as the encoder and every cost scales with the counted tokens.

Time per real token = (data wait + step time) / real history tokens over the timed steps,
after `--warmup` untimed steps per m. `time_per_token_max_ratio` = slowest / fastest of the
three. The table also gives each batch's longest history (capped at m) and the padding
the encoder still computes: rows are encoded in length groups, each padded to its own
longest row (models/length_groups.py), and the HSTU attention is blocked and causal
(models/hstu_attention.py: no upper triangle, nothing T x T kept for backward). Model
FLOPs per real token: bench/train.py step_flops.

Writes bench/results/seq_len.json: `time_per_token_max_ratio` and, per m, the figures above,
cpu_busy_frac (see bench/train.py) and the process's peak RSS so far.
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import peak_gflops, write_result  # noqa: E402
from bench.train import BASE_CONFIG, build_trainer, step_flops, timed_steps  # noqa: E402
from configs.loading import config_to_dict, load_config  # noqa: E402
from data.loader import TrainLoader  # noqa: E402
from data.prepare import prepare  # noqa: E402
from data.sequences import Queries  # noqa: E402
from trainer.build import train_batch_builder  # noqa: E402

DATA = "synthetic:events=3e5,actors=3e3,targets=3e4"
MODEL = ["model.encoder=hstu", "model.embedding_dim=256", "model.num_layers=4", "model.num_heads=4",
         "model.repeat_window=0"]
QUICK_MODEL = ["model.encoder=hstu", "model.embedding_dim=32", "model.num_layers=1", "model.num_heads=2",
               "model.repeat_window=0"]


def subset(queries: Queries, rows: np.ndarray) -> Queries:
    return Queries(
        sequence=queries.sequence[rows], position=queries.position[rows], history_start=queries.history_start[rows]
    )


def measure(data: str, max_len: int, model: list[str], overrides: list[str], prepared, total_tokens: int,
            tokens_per_batch: int, warmup: int, peak: float) -> dict:
    queries = prepared.split.train_queries(prepared.seqs, 1)
    lengths = np.minimum(queries.position - queries.history_start, max_len)
    batch_size = max(1, round(tokens_per_batch / lengths.mean()))
    config = load_config(BASE_CONFIG, [f"data.path={data}", f"data.max_len={max_len}", *model,
                                       f"loader.batch_size={batch_size}", *overrides])
    # A fixed random subset of the training examples holding the token budget (plus warm-up).
    order = np.random.default_rng(0).permutation(len(queries))
    wanted = total_tokens + warmup * tokens_per_batch
    chosen = order[: int(np.searchsorted(np.cumsum(lengths[order]), wanted)) + 1]
    builder = train_batch_builder(config, prepared, subset(queries, chosen))
    steps = len(chosen) // batch_size - warmup
    if steps < 1:
        raise SystemExit(f"max_len {max_len}: --total-tokens {total_tokens} fills no timed batch of {batch_size}; raise it")
    loader = TrainLoader(builder, batch_size=batch_size, seed=config.seed)

    trainer = build_trainer(config, prepared)
    batches = iter(loader)
    timed_steps(trainer, batches, warmup)
    timing = timed_steps(trainer, batches, steps)
    model_flops = sum(sum(step_flops(config, s.shape).values()) for s in timing.steps)
    widths = [s.shape.width for s in timing.steps]
    real = np.concatenate([s.shape.lengths for s in timing.steps])
    trainer.close()
    return {
        "max_len": max_len,
        "batch_size": batch_size,
        "steps": steps,
        "real_tokens": timing.tokens,
        "examples": timing.examples,
        "history_length": {
            "mean": float(real.mean()), "p50": float(np.percentile(real, 50)), "p90": float(np.percentile(real, 90)),
            "p99": float(np.percentile(real, 99)), "max": int(real.max()), "at_max_frac": float((real == max_len).mean()),
        },
        "mean_padded_width": float(np.mean(widths)),
        "padding_frac": 1 - timing.tokens / timing.padded_tokens,
        "seconds": timing.total_s,
        "data_wait_frac": timing.data_s / timing.total_s,
        "time_per_token_us": 1e6 * timing.total_s / timing.tokens,
        "tokens_per_s": timing.tokens / timing.total_s,
        "model_flop_per_token": model_flops / timing.tokens,
        "mfu": model_flops / timing.total_s / (peak * 1e9),
        "cpu_busy_frac": timing.cpu_busy_frac,
        # The process's peak so far (lengths run in the order given, so the longest last).
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "config": config_to_dict(config),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 200, 1000], help="max history lengths")
    parser.add_argument("--data", default=DATA, help="data.path of the log (a synthetic: spec by default)")
    parser.add_argument("--total-tokens", type=int, default=None, help="real tokens timed per length (default 32768)")
    parser.add_argument("--tokens-per-batch", type=int, default=None, help="real tokens per batch (default 4096)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per length")
    parser.add_argument("--quick", action="store_true", help="tiny model, few tokens (a smoke run); writes nothing")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.num_heads=1")
    args = parser.parse_args()
    total_tokens = args.total_tokens or (1024 if args.quick else 32768)
    tokens_per_batch = args.tokens_per_batch or (256 if args.quick else 4096)
    model = QUICK_MODEL if args.quick else MODEL
    peak = peak_gflops("fp32")

    prepared = prepare(load_config(BASE_CONFIG, [f"data.path={args.data}"]).data)
    workloads = {}
    for max_len in args.lengths:
        workloads[str(max_len)] = measure(
            args.data, max_len, model, args.overrides, prepared, total_tokens, tokens_per_batch, args.warmup, peak
        )
        w = workloads[str(max_len)]
        print(f"max_len {max_len}: {w['steps']} steps of {w['batch_size']}, {w['seconds']:.1f} s", file=sys.stderr)
    per_token = [w["time_per_token_us"] for w in workloads.values()]
    ratio = max(per_token) / min(per_token)
    fastest = min(per_token)

    print(
        "| max len | batch | steps | real tokens | mean / p90 / max length | longest | group padding | data wait "
        "| us per token | vs fastest | model FLOP/token | MFU | CPU busy | peak RSS GB |\n"
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for w in workloads.values():
        h = w["history_length"]
        print(
            f"| {w['max_len']} | {w['batch_size']} | {w['steps']} | {w['real_tokens']:,} "
            f"| {h['mean']:.0f} / {h['p90']:.0f} / {h['max']} | {w['mean_padded_width']:.0f} | {w['padding_frac']:.0%} "
            f"| {w['data_wait_frac']:.1%} | {w['time_per_token_us']:.1f} | {w['time_per_token_us'] / fastest:.2f}x "
            f"| {w['model_flop_per_token'] / 1e6:.1f} M | {w['mfu']:.3f} "
            f"| {w['cpu_busy_frac']:.2f} | {w['peak_rss_gb']:.1f} |"
        )
    print(
        f"time per real token, slowest / fastest: {ratio:.2f}x (target <= 1.3x). 'longest': the batch's longest "
        "history; 'group padding': padded positions the encoder computes, over all it computes."
    )
    results = {
        "time_per_token_max_ratio": ratio,
        "data": args.data,
        "total_tokens": total_tokens,
        "tokens_per_batch": tokens_per_batch,
        "padding": "length groups, each padded to its longest row; blocked causal attention",
        "lengths": workloads,
        "peak_fp32_gflops": peak,
        "overrides": args.overrides,
        "quick": args.quick,
    }
    if args.quick:
        print("quick run: nothing written")
    else:
        print(f"wrote {write_result('seq_len', results)}")


if __name__ == "__main__":
    main()
