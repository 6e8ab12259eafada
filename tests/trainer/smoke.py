"""A Trainer of the smoke config, for tests that drive it step by step."""

from __future__ import annotations

from pathlib import Path

from configs.loading import load_config
from data.prepare import prepare
from trainer.loop import Trainer
from trainer.metrics import MetricsLogger

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def config_trainer(name: str, *overrides: str) -> Trainer:
    """A Trainer of shipped config `name` with `key=value` overrides; no TensorBoard."""
    config = load_config(CONFIG_DIR / f"{name}.yaml", list(overrides))
    return Trainer(config, prepare(config.data), MetricsLogger(None, enabled=False))


def smoke_trainer(*overrides: str) -> Trainer:
    return config_trainer("smoke", *overrides)
