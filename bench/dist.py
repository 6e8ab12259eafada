"""1 against 2 ranks on CPU (gloo): training throughput on the synthetic log, per rank and
in all, and the share of step time spent in communication.

    .venv/bin/python bench/dist.py
    .venv/bin/python bench/dist.py --steps 10 model.embedding_dim=32

Each launch is `torch.distributed.run` (what torchx's dist.ddp runs) over this file's
worker, which builds the product's Trainer (trainer/loop.py: DMP-sharded ID tables, DDP
towers, the in-batch negatives gathered across ranks) and times `--steps` training steps
after `--warmup` untimed ones; the ranks share the machine's cores (1 rank: every core's
threads; 2 ranks: half each, as torchx would set them). Both launches use the same
per-rank batch (loader.batch_size), so 2 ranks train twice the examples per step.

Communication: PROFILED_STEPS more steps per rank run under torch.profiler; the share is the time
the training thread spends in collective calls (gloo all-reduce / all-gather / all-to-all
and their waits: TorchRec's embedding all-to-alls, the gradient all-reduce, the in-batch
gather), over those steps' wall time. A 1-rank launch still shards (onto itself), so it
runs the same kernels; its collectives are trivial.

Workload: configs/synthetic-scale.yaml's model (HSTU, D = 64) on a smaller generated log
(DATA below), so both launches take a few minutes. Writes bench/results/dist.json:
`examples_per_s_1rank`, `examples_per_s_2ranks` (global), per rank, `scaling` (2-rank
global over 1-rank), the communication share of each, the step times and the configs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "synthetic-scale.yaml"
DATA = "synthetic:events=1e6,actors=1e5,targets=1e6"
PROFILED_STEPS = 5
def _is_collective(name: str) -> bool:
    """Profiler events of collectives and of waiting for them: c10d ops (all-reduce,
    all-gather, all-to-all), TorchRec's awaitables (`## ... wait() ##`, `[output_dist_wait]`)
    and its sequence all-to-all requests."""
    lowered = name.lower()
    if lowered.startswith("autograd::engine::evaluate_function"):
        return False  # a wrapper: its children are counted themselves
    return lowered.startswith("c10d::") or "wait()" in lowered or "dist_wait" in lowered or "all2all" in lowered


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as torch_dist
    from torch.profiler import ProfilerActivity, profile

    from bench.train import timed_steps
    from configs.loading import load_config
    from data.prepare import prepare
    from trainer.distributed import close_distributed, init_distributed
    from trainer.loop import Trainer
    from trainer.metrics import MetricsLogger

    config = load_config(CONFIG, [f"data.path={DATA}", "train.keep_checkpoints=0", *args.overrides])
    dist = init_distributed(config.distributed)
    try:
        trainer = Trainer(config, prepare(config.data), MetricsLogger(None, enabled=False), dist)
        batches = iter(trainer.loader)
        timed_steps(trainer, batches, args.warmup)
        dist.barrier()
        timing = timed_steps(trainer, batches, args.steps)
        step_s = [s.data_s + s.step_s for s in timing.steps]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(PROFILED_STEPS):
                trainer.train_step(next(batches))
            profiled_s = time.perf_counter() - start
        # Self time of the collective ops and of what they wait in, on the training thread.
        events = [e for e in prof.events() if e.thread == prof.events()[0].thread] if prof.events() else []
        comm_us = sum(e.self_cpu_time_total for e in events if _is_collective(e.name))
        figures = torch.tensor([timing.examples / timing.total_s, comm_us / 1e6 / profiled_s, timing.total_s])
        gathered = [torch.zeros_like(figures) for _ in range(dist.world_size)]
        if dist.world_size > 1:
            torch_dist.all_gather(gathered, figures)
        else:
            gathered = [figures]
        if dist.is_main:
            Path(args.out).write_text(json.dumps({
                "ranks": dist.world_size,
                "threads_per_rank": torch.get_num_threads(),
                "examples_per_s_per_rank": [float(g[0]) for g in gathered],
                "comm_frac_per_rank": [float(g[1]) for g in gathered],
                "timed_s_per_rank": [float(g[2]) for g in gathered],
                "step_s_rank0": step_s,
                "batch_size_per_rank": config.loader.batch_size,
            }))
        trainer.close()
    finally:
        close_distributed(dist)


def launch(ranks: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            str(Path(__file__).resolve()), "--worker", "--out", str(out), "--steps", str(args.steps),
            "--warmup", str(args.warmup), *args.overrides,
        ]
        threads = max(1, (os.cpu_count() or 1) // ranks)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, env=env, check=True)
        figures = json.loads(out.read_text())
    figures["wall_s"] = time.perf_counter() - start
    figures["examples_per_s"] = sum(figures["examples_per_s_per_rank"])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per launch")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides for both launches")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from bench.common import write_result
    from configs.loading import config_to_dict, load_config

    config = load_config(CONFIG, [f"data.path={DATA}", *args.overrides])  # a bad override fails here
    one, two = launch(1, args), launch(2, args)
    results = {
        "examples_per_s_1rank": one["examples_per_s"],
        "examples_per_s_2ranks": two["examples_per_s"],
        "examples_per_s_per_rank_2ranks": two["examples_per_s_per_rank"],
        "scaling": two["examples_per_s"] / one["examples_per_s"],
        "comm_frac_1rank": one["comm_frac_per_rank"][0],
        "comm_frac_2ranks": max(two["comm_frac_per_rank"]),
        "launches": {"1": one, "2": two},
        "data": DATA, "steps": args.steps, "warmup": args.warmup, "overrides": args.overrides,
        "config": config_to_dict(config),
    }
    print("| ranks | threads per rank | examples/s (all) | examples/s per rank | communication share |")
    print("|---:|---:|---:|---|---|")
    for figures in (one, two):
        per_rank = " / ".join(f"{v:.0f}" for v in figures["examples_per_s_per_rank"])
        comm = " / ".join(f"{v:.0%}" for v in figures["comm_frac_per_rank"])
        print(f"| {figures['ranks']} | {figures['threads_per_rank']} | {figures['examples_per_s']:.0f} | {per_rank} "
              f"| {comm} |")
    print(f"2 ranks / 1 rank: {results['scaling']:.2f}x the examples per second (same per-rank batch, same cores)")
    print(f"wrote {write_result('dist', results)}")


if __name__ == "__main__":
    main()
