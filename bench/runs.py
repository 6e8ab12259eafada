"""Training runs for the quality benchmarks: one config, one seed, in a scratch directory."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from configs.loading import load_config
from trainer.main import run


def train_and_test(config_path: Path, overrides: list[str], seed: int) -> tuple[dict, float]:
    """Train, validate, test one config; (results as trainer.main writes them, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(config_path, [f"seed={seed}", f"output_dir={tmp}", *overrides])
        start = time.perf_counter()
        results = run(config)
        return results, time.perf_counter() - start


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


DATASETS = ("collegemsg", "ml-100k")


def quality_arguments(description: str | None) -> argparse.ArgumentParser:
    """The options every quality benchmark takes: which logs, how many seeds, overrides."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=DATASETS, action="append", help="data set(s) to run (default: both)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every run")
    return parser
