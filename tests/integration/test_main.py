"""The main command end to end on the smoke config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_main_prepares_evaluates_and_writes_results(tmp_path):
    from trainer.main import main

    code = main(["--config", str(ROOT / "configs" / "smoke.yaml"), f"output_dir={tmp_path}"])
    assert code == 0
    run_dir = tmp_path / "smoke"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["data"]["evaluated_actors"] == 1077
    assert set(results["metrics"]["test"]) >= {"most_popular", "recency_frequency"}
    assert "| recency_frequency |" in (run_dir / "results.md").read_text()
    # the ID mapping is saved beside the prepared data
    assert (run_dir / "prepared" / "target_ids.parquet").exists()


def test_main_runs_as_a_script_path_and_reports_user_errors_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "trainer" / "main.py"), "trainer/main.py", "--config", "smoke", "loader.batch_sise=3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "did you mean 'loader.batch_size'" in result.stderr
    assert "Traceback" not in result.stderr
