"""Data preparation throughput, end to end: raw log file on disk -> ready sequences.

    .venv/bin/python bench/data.py [--events 1e7] [--format parquet|snap]

Generates a synthetic log (heavy-tailed, repetitive, bursty; 1e7 IDs of vocabulary),
writes it to a temporary file, then times the full preparation: reading and
checking, the ID mapping, sorting into sequences, the leave-last-out split and the
target frequency statistics. Writes bench/results/data.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_result  # noqa: E402
from configs.schema import DataConfig  # noqa: E402
from data.prepare import prepare  # noqa: E402
from data.synthetic import SyntheticLogSpec, generate, write_log  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=float, default=1e7)
    parser.add_argument("--vocabulary", type=float, default=1e7, help="target ID space")
    parser.add_argument("--actors", type=float, default=1e6)
    parser.add_argument("--format", choices=["parquet", "snap"], default="parquet")
    args = parser.parse_args()
    spec = SyntheticLogSpec(num_events=int(args.events), num_actors=int(args.actors), num_targets=int(args.vocabulary))

    start = time.perf_counter()
    frame = generate(spec)
    generate_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = write_log(frame, Path(tmp) / ("log.parquet" if args.format == "parquet" else "log.txt"))
        del frame
        start = time.perf_counter()
        prepared = prepare(DataConfig(path=str(path)))
        prepare_s = time.perf_counter() - start
        file_mb = path.stat().st_size / 2**20
    summary = prepared.summary()
    result = {
        "events": summary["events"],
        "events_per_s": summary["events"] / prepare_s,
        "prepare_s": prepare_s,
        "generate_s": generate_s,
        "format": args.format,
        "file_mb": file_mb,
        "actors": summary["actors"],
        "targets": summary["targets"],
        "candidates": summary["candidates"],
        "evaluated_actors": summary["evaluated_actors"],
    }
    path = write_result("data" if args.format == "parquet" else f"data_{args.format}", result)
    print(f"| events | format | generate s | prepare s | events/s |\n|---:|---|---:|---:|---:|")
    print(f"| {result['events']:,} | {args.format} | {generate_s:.1f} | {prepare_s:.1f} | {result['events_per_s']:,.0f} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
