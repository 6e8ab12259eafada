"""Top-k retrieval with a trained run: raw IDs out, exclude-seen, odd requests, safe loading."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from data.events import load_event_log
from data.readers import DataError
from trainer.main import main
from trainer.predict import main as predict_main
from trainer.predict import predict

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main(["--config", str(ROOT / "configs" / "smoke.yaml"), f"output_dir={out}", "train.max_steps=8"]) == 0
    return out / "smoke"


def test_top_k_gives_raw_ids_in_score_order_and_can_exclude_seen(run_dir):
    frame = predict(run_dir, k=7, actors=[1, 5], actions=None, exclude_seen=True)
    assert frame.height == 14 and frame["actor"].unique().sort().to_list() == [1, 5]
    log = load_event_log(run_dir / "prepared")
    raw = log.events.with_columns(
        actor=pl.Series(log.actor_ids.to_raw(log.events["actor"].to_numpy())),
        target=pl.Series(log.target_ids.to_raw(log.events["target"].to_numpy())),
    )
    for actor in (1, 5):
        rows = frame.filter(pl.col("actor") == actor).sort("rank")
        assert rows["rank"].to_list() == list(range(1, 8))
        scores = rows["score"].to_numpy()
        assert (np.diff(scores) <= 0).all()
        seen = set(raw.filter(pl.col("actor") == actor)["target"].to_list())
        assert not seen & set(rows["target"].to_list())
    with_seen = predict(run_dir, k=50, actors=[1], actions=None, exclude_seen=False)
    seen_1 = set(raw.filter(pl.col("actor") == 1)["target"].to_list())
    assert seen_1 & set(with_seen["target"].to_list())  # repeat contacts are allowed by default


def test_next_action_file_and_odd_requests(run_dir, tmp_path):
    actions = tmp_path / "user_action_type.json"
    actions.write_text(json.dumps({"1": "<none>"}))
    actors = tmp_path / "actors.txt"
    actors.write_text("1\n424242\n")
    out = tmp_path / "p.parquet"
    assert predict_main(["--run", str(run_dir), "--actors", str(actors), "--actions", str(actions), "--out", str(out)]) == 0
    assert pl.read_parquet(out)["actor"].unique().to_list() == [1]  # the unknown actor is skipped
    assert predict(run_dir, k=3, actors=[], actions=None, exclude_seen=False).height == 0
    with pytest.raises(DataError, match="action type 'like', which the model never saw"):
        predict(run_dir, k=3, actors=[1], actions={"1": "like"}, exclude_seen=False)


class _Exploit:
    def __reduce__(self):
        return (Path("/tmp/pwned-by-checkpoint").touch, ())


def test_a_crafted_checkpoint_that_runs_code_fails_safely(run_dir, tmp_path):
    crafted = tmp_path / "run"
    crafted.mkdir()
    for name in ("config.yaml",):
        (crafted / name).write_text((run_dir / name).read_text())
    (crafted / "prepared").symlink_to(run_dir / "prepared")
    (crafted / "model").mkdir()
    (crafted / "model" / "rank-00000.pt").write_bytes(pickle.dumps({"weights": _Exploit()}))
    marker = Path("/tmp/pwned-by-checkpoint")
    marker.unlink(missing_ok=True)
    with pytest.raises(pickle.UnpicklingError):
        predict(crafted, k=3, actors=[1], actions=None, exclude_seen=False)
    assert not marker.exists()
    assert torch.load(run_dir / "model" / "rank-00000.pt", weights_only=True)  # the real one loads
