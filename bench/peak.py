"""The machine's measured dense matmul throughput, the denominator of every MFU figure.

    .venv/bin/python bench/peak.py

Times torch.matmul at the shapes the model uses (fp32 and bf16) with torch's default
threads and writes bench/results/peak.json: GFLOP/s per shape and dtype, and the best of
each dtype as `fp32_gflops` / `bf16_gflops` (what other benchmarks divide by). Run it on
a quiet machine: anything else running lowers the peak and inflates every MFU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import matmul_gflops, write_result  # noqa: E402

# (m, k, n): m rows through a k -> n projection.
SHAPES = {
    "hstu_uvqk_d256": (128 * 201, 256, 1024),  # batch 128 x 201 positions, D 256 -> U, V, Q, K
    "hstu_attention_t201": (201, 64, 201),  # one head's Q K^T (small: per batch row and head)
    "eval_scores_d256": (1024, 256, 65536),  # 1024 queries x a 65536-candidate chunk
    "square_2048": (2048, 2048, 2048),
}


def main() -> None:
    # No options; --help must not overwrite peak.json with a measurement.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    figures: dict = {"shapes": {}}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for shape_name, (m, k, n) in SHAPES.items():
            # CPUs without native bf16 emulate it ~100x slower: fewer rows keep this short.
            rows = m if dtype == torch.float32 else max(1, min(m, int(2e8 / (2 * k * n))))
            figures["shapes"].setdefault(shape_name, {"m": m, "k": k, "n": n})[name] = matmul_gflops(rows, k, n, dtype)
        figures[f"{'fp32' if dtype == torch.float32 else 'bf16'}_gflops"] = max(
            shape[name] for shape in figures["shapes"].values()
        )
    path = write_result("peak", figures)
    print("| shape | m x k x n | fp32 GFLOP/s | bf16 GFLOP/s |\n|---|---|---:|---:|")
    for shape_name, shape in figures["shapes"].items():
        print(f"| {shape_name} | {shape['m']} x {shape['k']} x {shape['n']} | {shape['float32']:.1f} | {shape['bfloat16']:.1f} |")
    print(f"peak fp32 {figures['fp32_gflops']:.1f} GFLOP/s, bf16 {figures['bf16_gflops']:.1f} GFLOP/s; wrote {path}")


if __name__ == "__main__":
    main()
