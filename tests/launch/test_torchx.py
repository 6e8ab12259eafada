"""The documented torchx command launches a 2-rank CPU job that trains and writes results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.predict import predict

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_torchx_dist_ddp_runs_two_cpu_ranks_with_the_script_path_as_typed(tmp_path):
    # torchx's local scheduler starts `torchrun` from PATH: the venv's, as after `source .venv/bin/activate`.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [
        str(Path(sys.executable).parent / "torchx"), "run", "-s", "local_cwd", "dist.ddp", "-j", "1x2",
        "trainer/main.py", "--config", "configs/smoke.yaml", f"output_dir={tmp_path}", "train.max_steps=4",
        "train.eval_every_steps=4",
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "smoke" / "results.json").read_text())
    assert results["training"]["steps"] == 4
    assert results["metrics"]["test"]["model"]["hr@10"] > 0
    # Each rank exported the rows of the sharded tables it holds.
    assert sorted(p.name for p in (tmp_path / "smoke" / "model").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]
    # Only rank 0 reports: one results table in the output.
    assert (done.stdout + done.stderr).count("| model | HR@1") == 1
    # The exported model serves without sharding.
    top = predict(tmp_path / "smoke", k=3, actors=None, actions=None, exclude_seen=False)
    assert top.height > 0 and sorted(set(top["rank"].to_list())) == [1, 2, 3]
