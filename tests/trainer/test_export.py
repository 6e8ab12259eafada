"""The serving export: plain tensors that stitch back into the model's exact state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from configs.loading import load_config
from data.prepare import prepare
from trainer.distributed import Distributed
from trainer.export import EXPORT_DIR, export_model, load_exported
from trainer.loop import build_model

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def model():
    config = load_config(CONFIG)
    return build_model(config, prepare(config.data))


def test_the_export_loads_back_as_the_same_state(model, tmp_path):
    export_model(model, tmp_path, Distributed())
    loaded = load_exported(tmp_path)
    state = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    # A second export replaces the first whole, leaving no temporary directory behind.
    export_model(model, tmp_path, Distributed())
    assert sorted(p.name for p in tmp_path.iterdir()) == [EXPORT_DIR]


def test_pieces_that_do_not_cover_a_table_are_refused(tmp_path):
    (tmp_path / EXPORT_DIR).mkdir()
    piece = {"key": "table", "shape": [4, 2], "offsets": [0, 0], "tensor": torch.ones(2, 2)}
    torch.save({"tensors": {}, "pieces": [piece]}, tmp_path / EXPORT_DIR / "rank-00000.pt")
    with pytest.raises(ValueError, match="do not cover"):
        load_exported(tmp_path)
    with pytest.raises(FileNotFoundError, match="no exported model"):
        load_exported(tmp_path / "elsewhere")
