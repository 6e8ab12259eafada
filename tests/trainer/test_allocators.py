"""A rank's freed polars buffers leave its resident memory (trainer/allocators.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Builds and drops a 0.48 GB polars frame; prints how much resident memory stayed (GB).
_PROBE = """
import sys
sys.path.insert(0, {root!r})
if {through_main}:
    import trainer.main  # noqa: F401  (as a rank starts)
import numpy as np
import polars as pl
from trainer.distributed import current_rss_gb
before = current_rss_gb()
frame = pl.DataFrame({{"a": np.arange(30_000_000), "b": np.arange(30_000_000)}})
frame.select((pl.col("a") * 2 + pl.col("b")).sum()).item()
del frame
print(current_rss_gb() - before)
"""


def _kept_gb(through_main: bool) -> float:
    env = {key: value for key, value in os.environ.items() if key != "_RJEM_MALLOC_CONF"}
    probe = _PROBE.format(root=str(ROOT), through_main=through_main)
    out = subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_a_rank_returns_the_polars_buffers_it_freed():
    # Started as trainer.main starts a rank, the dropped frame's memory is returned...
    assert _kept_gb(through_main=True) < 0.05
    # ...which polars' allocator alone does not do (so the check above can fail).
    assert _kept_gb(through_main=False) > 0.15
