"""Metrics sinks: TensorBoard under runs/<name>/, written by one rank only."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class MetricsLogger:
    """`log(scalars, step)`; a no-op logger when `enabled` is False (non-logging ranks)."""

    def __init__(self, log_dir: Path | None, enabled: bool = True) -> None:
        self.writer = SummaryWriter(log_dir=str(log_dir)) if enabled and log_dir is not None else None

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def log_config(self, config: dict) -> None:
        """The resolved config as text (log_hparams writes its fields as hparams, with
        the final metrics)."""
        if self.writer is None:
            return
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log_hparams(self, config: dict, metrics: dict[str, float]) -> None:
        if self.writer is None:
            return
        flat = {}

        def walk(prefix: str, node: dict) -> None:
            for key, value in node.items():
                name = f"{prefix}{key}"
                if isinstance(value, dict):
                    walk(name + ".", value)
                elif isinstance(value, (int, float, str, bool)):
                    flat[name] = value
                elif value is None:
                    flat[name] = "none"

        walk("", config)
        self.writer.add_hparams(flat, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
