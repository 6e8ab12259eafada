"""Data preparation throughput, end to end: raw log file on disk -> prepared dataset ->
ready sequences.

    .venv/bin/python bench/data.py [--events 1e7] [--format parquet|snap] [--partitions 64]
    .venv/bin/python bench/data.py --events 1e8 --actors 1e7     # the out-of-core figure

Generates a synthetic log (heavy-tailed, repetitive, bursty; 1e7 IDs of vocabulary) and
writes it to a temporary file. Then, in a process of its own (so its peak memory is its
own), `python -m data.prepare` turns it into the prepared dataset (reading and checking,
the ID mapping, the split, the target statistics, the partitioned event files); and
finally one process reads every partition back into sequences, split and statistics, as
a single-rank run does. Writes bench/results/data.json (data_snap.json for --format snap):
`events_per_s` is the prepare step's, `prepare_peak_rss_gb` its peak resident memory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import prepare_dataset_in_child, write_result  # noqa: E402
from configs.schema import DataConfig  # noqa: E402
from data.dataset import PreparedDataset  # noqa: E402
from data.prepare import prepare_from_dataset  # noqa: E402
from data.synthetic import SyntheticLogSpec, generate, write_log  # noqa: E402


def prepare_in_child(log: Path, out: Path, partitions: int) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of `python -m data.prepare` on `log`, in its own process."""
    config = out.parent / "bench-data.yaml"
    config.write_text(f"name: bench-data\ndata:\n  path: {log}\n  partitions: {partitions}\n")
    return prepare_dataset_in_child(config, [], out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=float, default=1e7)
    parser.add_argument("--vocabulary", type=float, default=1e7, help="target ID space")
    parser.add_argument("--actors", type=float, default=1e6)
    parser.add_argument("--format", choices=["parquet", "snap"], default="parquet")
    parser.add_argument("--partitions", type=int, default=64)
    args = parser.parse_args()
    spec = SyntheticLogSpec(num_events=int(args.events), num_actors=int(args.actors), num_targets=int(args.vocabulary))

    start = time.perf_counter()
    frame = generate(spec)
    generate_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        log = write_log(frame, Path(tmp) / ("log.parquet" if args.format == "parquet" else "log.txt"))
        del frame
        file_mb = log.stat().st_size / 2**20
        out = Path(tmp) / "prepared"
        prepare_s, prepare_rss = prepare_in_child(log, out, args.partitions)
        start = time.perf_counter()
        prepared = prepare_from_dataset(PreparedDataset.open(out), DataConfig(path=str(log), partitions=args.partitions))
        read_s = time.perf_counter() - start
        dataset_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    summary = prepared.summary()
    result = {
        "events": summary["events"],
        "events_per_s": summary["events"] / prepare_s,
        "prepare_s": prepare_s,
        "prepare_peak_rss_gb": prepare_rss,
        "read_s": read_s,
        "generate_s": generate_s,
        "format": args.format,
        "file_mb": file_mb,
        "dataset_mb": dataset_mb,
        "partitions": args.partitions,
        "actors": summary["actors"],
        "targets": summary["targets"],
        "candidates": summary["candidates"],
        "evaluated_actors": summary["evaluated_actors"],
    }
    # data.json is the 1e7-event figure; other sizes get their own file (data_1e8.json).
    name = "data" if args.format == "parquet" else f"data_{args.format}"
    if int(args.events) != 10_000_000:
        name += "_" + f"{args.events:.0e}".replace("e+0", "e").replace("e+", "e")
    path = write_result(name, result)
    print("| events | format | generate s | prepare s | events/s | prepare peak RSS GB | read back s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    print(f"| {result['events']:,} | {args.format} | {generate_s:.1f} | {prepare_s:.1f} | "
          f"{result['events_per_s']:,.0f} | {prepare_rss:.2f} | {read_s:.1f} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
