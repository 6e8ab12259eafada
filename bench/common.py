"""Shared helpers for benchmarks: where results go and how they are written."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; else what platform says): fp32 kernels round
    differently from one CPU to another and training amplifies it, so a figure is paired
    only with figures from the same CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


def write_result(name: str, result: dict, with_machine: bool = True) -> Path:
    """bench/results/<name>.json, written atomically, with the machine it ran on (unless
    the file has a fixed schema that leaves no room for it)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**result, "machine": machine()} if with_machine else result, indent=2) + "\n")
    tmp.replace(path)
    return path


# The child reports its own high-water mark (VmHWM of its address space after exec):
# ru_maxrss of a child counts the parent's pages mapped at fork (a benchmark holding a
# generated log), which would be reported as the child's.
_PREPARE_CHILD = """
import runpy, sys
sys.argv = ["data.prepare", *sys.argv[1:]]
try:
    runpy.run_module("data.prepare", run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
finally:
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
    print("VmHWM_kB", hwm.split()[1], file=sys.stderr)
"""


def prepare_dataset_in_child(config: Path | str, overrides: list[str], out: Path) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of `python -m data.prepare --config CONFIG --out OUT`
    in a process of its own."""
    import subprocess
    import sys
    import time

    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _PREPARE_CHILD, "--config", str(config), "--out", str(out), *overrides],
        cwd=Path(__file__).resolve().parent.parent, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )
    seconds = time.perf_counter() - start
    peak_kb = int(next(line.split()[1] for line in done.stderr.splitlines() if line.startswith("VmHWM_kB")))
    return seconds, peak_kb * 1024 / 1e9


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, min_seconds: float = 1.0) -> float:
    """Measured GFLOP/s of an [m, k] @ [k, n] matmul (best of repeated timings)."""
    import time

    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up
    best, spent = float("inf"), 0.0
    while spent < min_seconds:
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return 2.0 * m * k * n / best / 1e9


def peak_gflops(dtype: str = "fp32") -> float:
    """The MFU denominator, in GFLOP/s: the larger of what bench/peak.py measured (run it
    first) and a fresh measurement of its square fp32 shape now. This machine's peak moved
    by 13% between runs (389 and 440 GFLOP/s): the larger is the conservative choice, and
    the fresh one is measured in the same run as the figure it divides."""
    path = RESULTS_DIR / "peak.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run .venv/bin/python bench/peak.py first")
    recorded = json.loads(path.read_text())[f"{dtype}_gflops"]
    if dtype != "fp32":
        return recorded
    return max(recorded, matmul_gflops(2048, 2048, 2048, torch.float32))
