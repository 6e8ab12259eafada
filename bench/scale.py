"""Scale: a 1e7-row ID table (D = 64) sharded row-wise over CPU ranks, each rank reading
only its share of the prepared dataset, trains a few hundred steps, validates and tests,
with each rank's memory reported and broken down.

    .venv/bin/python bench/scale.py                  # configs/synthetic-scale.yaml, 2 ranks
    .venv/bin/python bench/scale.py --ranks 4
    .venv/bin/python bench/scale.py --events 1e8 --actors 1e7 --targets 1e7   # a parquet log on disk

First the prepare step runs alone (`python -m data.prepare` in a process of its own: its
seconds and peak memory), from the config's synthetic log or, with --events, from a
synthetic parquet log written to disk first (actors and targets distinct). Then
`torch.distributed.run` (what torchx's dist.ddp runs) launches trainer/main.py on the
prepared dataset, one thread per rank, and the run's results.json gives every rank's
figures. Writes bench/results/scale.json (scale_1e8.json for --events 1e8,
scale_4ranks.json for --ranks 4, scale_1ranks.json for --ranks 1; each rewritten by its own run): rows, dim, ranks, peak_rss_gb_per_rank, examples_per_s (global, validation and
checkpoints not counted), test (the metrics over the sampled actors), and
`baseline_rss_gb` (per rank: after imports and process-group set-up, before any data),
`events_held_per_rank` (events in memory: a rank's actors' own and, in a shared ID space,
those that reached them), the table and optimizer shards per rank, `eval_buffers_gb_per_rank`
(the candidate vectors a rank holds while it ranks: its table rows x D x 4 bytes up to
`eval.max_held_vectors_gb`, else two blocks of them) and `prepare`
(`events`, `events_per_s`, `peak_rss_gb`). The whole table in fp32 is rows x dim x 4 bytes
(2.56 GB at 1e7 x 64).
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

from bench.common import prepare_dataset_in_child, write_result  # noqa: E402
from configs.loading import load_config  # noqa: E402
from trainer.scoring import held_vector_bytes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--config", default=str(ROOT / "configs" / "synthetic-scale.yaml"))
    parser.add_argument("--events", type=float, help="write a synthetic parquet log of this many events first")
    parser.add_argument("--actors", type=float, default=1e7)
    parser.add_argument("--targets", type=float, default=1e7)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=50")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*args.overrides, f"data.prepared_path={Path(tmp) / 'prepared'}"]
        if args.events:
            log = Path(tmp) / "log.parquet"
            subprocess.run(
                [sys.executable, "-m", "data.synthetic", "--events", str(args.events), "--actors", str(args.actors),
                 "--targets", str(args.targets), "--out", str(log)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
            )
            overrides.append(f"data.path={log}")
        config = load_config(args.config, overrides)  # fail on a bad override before launching
        prepare_s, prepare_gb = prepare_dataset_in_child(args.config, overrides, Path(tmp) / "prepared")
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
            "-m", "trainer.main", "--config", args.config, f"output_dir={tmp}", *overrides,
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
    table_rows = resources["table_rows_per_rank"].get("target_ids", [])
    figures = {
        "rows": rows,
        "dim": dim,
        "ranks": args.ranks,
        "table_gb": rows * dim * 4 / 1e9,
        "peak_rss_gb_per_rank": resources["peak_rss_gb_per_rank"],
        "baseline_rss_gb": resources["baseline_rss_gb_per_rank"],
        "events_held_per_rank": resources["events_held_per_rank"],
        "table_gb_per_rank": resources["table_gb_per_rank"],
        "optimizer_gb_per_rank": resources["optimizer_gb_per_rank"],
        "eval_buffers_gb_per_rank": [
            round(held_vector_bytes(r, dim, config.eval.max_held_vectors_gb * 1e9) / 1e9, 3) for r in table_rows
        ],
        "table_rows_per_rank": resources["table_rows_per_rank"],
        "rss_gb_after_per_rank": resources["rss_gb_after_per_rank"],
        "examples_per_s": results["training"]["examples_per_s"],
        "steps": results["training"]["steps"],
        "events": results["data"]["events"],
        "evaluated_actors": results["data"]["evaluated_actors"],
        "candidates": results["data"]["candidates"],
        "test": results["metrics"]["test"]["model"],
        "prepare": {"events": results["data"]["events"], "events_per_s": results["data"]["events"] / prepare_s,
                    "peak_rss_gb": round(prepare_gb, 3), "seconds": prepare_s},
        "wall_s": wall_s,
        "overrides": args.overrides,
        "log": "synthetic parquet on disk" if args.events else "the config's synthetic log",
    }
    # scale.json is the config's log on 2 ranks; a log written with --events gets its own
    # file (scale_1e8.json), and so does another number of ranks (scale_4ranks.json).
    name = "scale" + ("_" + f"{args.events:.0e}".replace("e+0", "e").replace("e+", "e") if args.events else "")
    name += f"_{args.ranks}ranks" if args.ranks != 2 else ""
    path = write_result(name, figures)
    held = ", ".join(f"{name}: {per_rank}" for name, per_rank in figures["table_rows_per_rank"].items())
    print(
        f"| rows | ranks | peak RSS GB per rank | baseline GB | events held per rank | examples/s | test NDCG@10 "
        f"| prepare events/s | prepare peak GB | wall s |\n"
        f"|---:|---:|---|---|---|---:|---:|---:|---:|---:|\n"
        f"| {rows:,} | {args.ranks} | {figures['peak_rss_gb_per_rank']} | {figures['baseline_rss_gb']} "
        f"| {figures['events_held_per_rank']} | {figures['examples_per_s']:.0f} | {figures['test']['ndcg@10']:.4f} "
        f"| {figures['prepare']['events_per_s']:,.0f} | {prepare_gb:.2f} | {wall_s:.0f} |\n"
        f"rows held per rank: {held}\nresident GB after each phase: {figures['rss_gb_after_per_rank']}\n"
        f"wrote {path}"
    )


if __name__ == "__main__":
    main()
