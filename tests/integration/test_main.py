"""The main command end to end on the smoke config."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from trainer.evaluation import METRIC_NAMES
from trainer.main import main

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def test_smoke_run_trains_validates_tests_and_writes_results_and_tensorboard(tmp_path):
    assert main(["--config", SMOKE, f"output_dir={tmp_path}"]) == 0
    run_dir = tmp_path / "smoke"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["data"]["evaluated_actors"] == 1077
    assert set(results["metrics"]["test"]) == {"model", "most_popular", "recency_frequency", "two_way_recency_frequency"}
    assert results["training"]["steps"] == 24
    assert 0.0 <= results["metrics"]["test"]["model"]["ndcg@10"] <= 1.0
    assert "| model |" in (run_dir / "results.md").read_text()
    assert (run_dir / "prepared" / "actor_ids.parquet").exists()  # ID maps beside the data (one: a shared space)
    assert (run_dir / "prepared" / "manifest.json").exists()

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = [
        "loss/main", "loss/temporal", "lr", "grad_norm", "examples_per_s",
        *(f"retrieval/masked_frac/{reason}" for reason in ("accidental_hit", "in_history", "duplicate_of_history")),
        *(f"retrieval/logq/{source}" for source in ("in_batch", "random", "history")),
        "retrieval/sim/positive", "retrieval/sim/hardest_negative",
        *(f"{split}/{metric}" for split in ("valid", "test") for metric in METRIC_NAMES),
    ]
    assert not [tag for tag in expected if tag not in tags]
    assert len(events.Scalars("valid/ndcg@10")) == 3  # every 8 of 24 steps
    assert len(events.Scalars("test/ndcg@10")) == 1  # the test split once, at the best model
    assert events.Scalars("test/ndcg@10")[0].value == pytest.approx(results["metrics"]["test"]["model"]["ndcg@10"])
    assert "config/text_summary" in events.Tags()["tensors"]
    plugins = {
        value.metadata.plugin_data.plugin_name
        for path in (run_dir / "tensorboard").glob("events.out.tfevents.*")
        for event in EventFileLoader(str(path)).Load()
        for value in event.summary.value
    }
    assert "hparams" in plugins  # the config as hparams, beside the final metrics


def test_early_stopping_ends_training_after_patience_validations_without_gain(tmp_path):
    # Learning rates near zero: validation never improves after the first evaluation.
    overrides = [f"output_dir={tmp_path}", "optim.lr=1e-12", "optim.sparse_lr=1e-12", "optim.repeat_lr=1e-12", "train.max_steps=100",
                 "train.eval_every_steps=4", "train.patience=2", "model.dropout=0.0"]
    assert main(["--config", SMOKE, *overrides]) == 0
    training = json.loads((tmp_path / "smoke" / "results.json").read_text())["training"]
    assert training["stopped_early"]
    assert training["steps"] == 12 and training["best_step"] == 4


def test_same_config_and_seed_give_identical_metrics_and_bf16_towers_train(tmp_path):
    results = []
    for name, precision in (("a", "fp32"), ("b", "fp32"), ("c", "bf16")):
        overrides = [f"output_dir={tmp_path}", f"name={name}", "train.max_steps=8", f"train.precision={precision}"]
        assert main(["--config", SMOKE, *overrides]) == 0
        results.append(json.loads((tmp_path / name / "results.json").read_text())["metrics"])
    assert results[0] == results[1]
    # bf16 reached the towers (other rounding, other metrics) and still learned something.
    assert results[2] != results[0]
    assert results[2]["valid"]["model"]["ndcg@10"] > results[2]["valid"]["most_popular"]["ndcg@10"]


def test_main_runs_as_a_script_path_and_reports_user_errors_in_one_line(tmp_path):
    # As on a torchx image without `pip install -e .`: -S skips site-packages' .pth files
    # (the editable install), PYTHONPATH still finds torch and the other libraries.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages())}
    result = subprocess.run(
        [sys.executable, "-S", str(ROOT / "trainer" / "main.py"), "trainer/main.py", "--config", "smoke",
         "loader.batch_sise=3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 2
    assert "did you mean 'loader.batch_size'" in result.stderr
    assert "Traceback" not in result.stderr


def test_smoke_run_with_sparse_target_features(tmp_path):
    features = tmp_path / "people.csv"
    features.write_text("target,cohort\n" + "".join(f"{i},c{i % 7}\n" for i in range(1, 1900)))
    overrides = [f"output_dir={tmp_path}", f"data.target_features_path={features}", "train.max_steps=8"]
    assert main(["--config", SMOKE, *overrides]) == 0
    results = json.loads((tmp_path / "smoke" / "results.json").read_text())
    assert results["data"]["target_features"]["tokens"] == 7
