"""The serving export: plain tensors that stitch back into the model's exact state."""

from __future__ import annotations

import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch

from configs.loading import load_config
from data.prepare import prepare
from trainer.distributed import Distributed
from trainer.export import EXPORT_DIR, ExportError, export_model, load_exported
from trainer.build import build_model

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
    with pytest.raises(ExportError, match="do not cover"):
        load_exported(tmp_path)
    with pytest.raises(ExportError, match="no exported model"):
        load_exported(tmp_path / "elsewhere")


class _RunsCode:
    """Pickles to a call of os.system: loading it unsafely would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _write(path: Path, kind: str, marker: Path) -> None:
    """One rank file that this project did not write, of the given kind."""
    if kind == "pickle that runs code":
        path.write_bytes(pickle.dumps({"tensors": _RunsCode(marker), "pieces": []}))
    elif kind == "torch.save that runs code":
        torch.save({"tensors": {"w": torch.ones(2)}, "pieces": [_RunsCode(marker)]}, path)
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"tensors": {"w": torch.ones(64)}, "pieces": []}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("kind", ["pickle that runs code", "torch.save that runs code", "garbage", "empty", "truncated"])
def test_a_damaged_or_crafted_file_is_refused_in_one_line_without_running_it(tmp_path, kind, recwarn):
    (tmp_path / EXPORT_DIR).mkdir()
    path = tmp_path / EXPORT_DIR / "rank-00000.pt"
    marker = tmp_path / "ran"
    _write(path, kind, marker)
    with pytest.raises(ExportError) as caught:
        load_exported(tmp_path)
    message = str(caught.value)
    assert not marker.exists()
    assert "\n" not in message and str(path) in message and "not a model file this project wrote" in message
    assert "python -m trainer.main" in message
    # torch's own advice (weights_only=False) would run the file's code: never passed on.
    assert "weights_only" not in message and caught.value.__cause__ is None
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]  # a foreign file adds no warning noise


@pytest.mark.parametrize(
    "saved, why",
    [
        ([torch.ones(2)], "expected a dict"),
        ({"tensors": {"w": torch.ones(2)}}, "expected a dict"),
        ({"tensors": [torch.ones(2)], "pieces": []}, "expected a dict"),
        ({"tensors": {"w": 3}, "pieces": []}, "maps 'w' to int, not a tensor"),
        ({"tensors": {}, "pieces": [{"key": "t", "shape": [4, 2], "tensor": torch.ones(2, 2)}]}, "piece 0"),
        ({"tensors": {}, "pieces": [{"key": "t", "shape": [4, 2], "offsets": [3, 0], "tensor": torch.ones(2, 2)}]}, "piece 0"),
        ({"tensors": {}, "pieces": [{"key": "t", "shape": ["4", 2], "offsets": [0, 0], "tensor": torch.ones(2, 2)}]}, "piece 0"),
        ({"tensors": {}, "pieces": ["t"]}, "piece 0"),
    ],
)
def test_a_file_that_loads_but_is_not_laid_out_as_an_export_is_refused_naming_it(tmp_path, saved, why):
    (tmp_path / EXPORT_DIR).mkdir()
    path = tmp_path / EXPORT_DIR / "rank-00000.pt"
    torch.save(saved, path)
    with pytest.raises(ExportError, match="not a model file this project wrote") as caught:
        load_exported(tmp_path)
    assert str(path) in str(caught.value) and why in str(caught.value) and "\n" not in str(caught.value)


def test_pieces_that_disagree_on_a_table_shape_are_refused(tmp_path):
    (tmp_path / EXPORT_DIR).mkdir()
    for rank, shape in enumerate(([4, 2], [6, 2])):
        piece = {"key": "t", "shape": shape, "offsets": [2 * rank, 0], "tensor": torch.ones(2, 2)}
        torch.save({"tensors": {}, "pieces": [piece]}, tmp_path / EXPORT_DIR / f"rank-{rank:05d}.pt")
    with pytest.raises(ExportError, match="rank-00001.pt.*disagrees with the others on its shape"):
        load_exported(tmp_path)
