"""Checkpoints: atomic, the last K kept, and a resumed run continues as if uninterrupted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from configs.loading import load_config
from data.prepare import prepare
from trainer.checkpoint import complete_checkpoints, latest_checkpoint, save_checkpoint
from trainer.distributed import Distributed
from trainer.loop import Trainer
from trainer.metrics import MetricsLogger

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


def _trainer(tmp_path: Path, **overrides: str) -> Trainer:
    defaults = {"train.max_steps": "12", "train.eval_every_steps": "4", "train.patience": "10",
                "train.keep_checkpoints": "3"}
    config = load_config(CONFIG, [f"{k}={v}" for k, v in {**defaults, **overrides}.items()])
    return Trainer(config, prepare(config.data), MetricsLogger(None, enabled=False), run_dir=tmp_path)


def test_a_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path):
    whole = _trainer(tmp_path / "whole")
    summary = whole.train()
    names = [p.name for p in complete_checkpoints(tmp_path / "whole" / "checkpoints")]
    assert names == ["step-00000004", "step-00000008", "step-00000012"]

    resumed = _trainer(tmp_path / "resumed")
    resumed.load_state_dict(tmp_path / "whole" / "checkpoints" / "step-00000008")
    assert resumed.step == 8
    resumed_summary = resumed.train()
    assert resumed_summary.steps == summary.steps and resumed_summary.best_step == summary.best_step
    assert resumed_summary.best_valid == summary.best_valid
    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    assert resumed.test() == whole.test()


def test_only_the_newest_checkpoints_are_kept_and_a_half_written_one_is_never_read(tmp_path):
    directory = tmp_path / "checkpoints"
    state = {"x": torch.arange(4.0)}
    for step in (1, 2, 3):
        save_checkpoint(directory, step, state, Distributed(), keep=2)
    assert [p.name for p in complete_checkpoints(directory)] == ["step-00000002", "step-00000003"]
    # A write that died half-way: a temporary directory, and a step directory without metadata.
    (directory / ".step-00000004.tmp").mkdir()
    (directory / "step-00000005").mkdir()
    assert latest_checkpoint(directory).name == "step-00000003"
    save_checkpoint(directory, 6, state, Distributed(), keep=2)
    assert not (directory / ".step-00000004.tmp").exists()


def test_a_failing_write_leaves_the_previous_checkpoint_and_raises(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    save_checkpoint(directory, 1, {"x": torch.ones(3)}, Distributed(), keep=2)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("trainer.checkpoint.dcp.save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(directory, 2, {"x": torch.zeros(3)}, Distributed(), keep=2)
    assert [p.name for p in complete_checkpoints(directory)] == ["step-00000001"]
