"""Scale: a 1e7-row ID table (D = 64) sharded row-wise over 2 CPU ranks trains a few
hundred steps, validates and tests, with each rank's peak memory reported.

    .venv/bin/python bench/scale.py                  # configs/synthetic-scale.yaml, 2 ranks
    .venv/bin/python bench/scale.py --ranks 1 train.max_steps=50

Launches `torch.distributed.run` (what torchx's dist.ddp runs) on trainer/main.py, one
thread per rank, and reads the run's results.json, where every rank reports its peak
resident memory and the rows of each ID table it holds. Writes bench/results/scale.json:
rows, dim, ranks, peak_rss_gb_per_rank (a list), examples_per_s (global, validation and
checkpoints not counted), the rows each rank holds, and the test metrics over the sampled
actors. The whole table in fp32 is rows x dim x 4 bytes (2.56 GB at 1e7 x 64).
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

from bench.common import write_result  # noqa: E402
from configs.loading import load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--config", default=str(ROOT / "configs" / "synthetic-scale.yaml"))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=50")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)  # fail on a bad override before launching

    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
            str(ROOT / "trainer" / "main.py"), "--config", args.config, f"output_dir={tmp}", *args.overrides,
        ]
        # The machine's cores split between the ranks, as torchx's dist.ddp would set them.
        threads = max(1, (os.cpu_count() or 1) // args.ranks)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, env=env, check=True)
        wall_s = time.perf_counter() - start
        results = json.loads((Path(tmp) / config.name / "results.json").read_text())

    rows = results["data"]["targets"]
    dim = config.model.embedding_dim
    resources = results["resources"]
    figures = {
        "rows": rows,
        "dim": dim,
        "ranks": args.ranks,
        "table_gb": rows * dim * 4 / 1e9,
        "peak_rss_gb_per_rank": resources["peak_rss_gb_per_rank"],
        "table_rows_per_rank": resources["table_rows_per_rank"],
        "examples_per_s": results["training"]["examples_per_s"],
        "steps": results["training"]["steps"],
        "events": results["data"]["events"],
        "evaluated_actors": results["data"]["evaluated_actors"],
        "candidates": results["data"]["candidates"],
        "test": results["metrics"]["test"]["model"],
        "wall_s": wall_s,
        "overrides": args.overrides,
    }
    path = write_result("scale", figures)
    held = ", ".join(f"{name}: {per_rank}" for name, per_rank in figures["table_rows_per_rank"].items())
    print(
        f"| rows | dim | ranks | table GB | peak RSS GB per rank | examples/s | test NDCG@10 | wall s |\n"
        f"|---:|---:|---:|---:|---|---:|---:|---:|\n"
        f"| {rows:,} | {dim} | {args.ranks} | {figures['table_gb']:.2f} | {figures['peak_rss_gb_per_rank']} "
        f"| {figures['examples_per_s']:.0f} | {figures['test']['ndcg@10']:.4f} | {wall_s:.0f} |\n"
        f"rows held per rank: {held}\nwrote {path}"
    )


if __name__ == "__main__":
    main()
