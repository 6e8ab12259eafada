"""The documented torchx command lines, typed as in the README, launch 2-rank CPU jobs that train and write results.

No `-s`: `.torchxconfig` makes local_cwd the default scheduler. Each launch is the smoke
config for 4 steps into a fresh run directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.predict import predict

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = ["train.max_steps=4", "train.eval_every_steps=4"]


def _torchx(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchx ARGS` from the repository root, as after `source .venv/bin/activate`: torchx's
    local scheduler starts `torchrun` from PATH. TORCHXCONFIG would replace `.torchxconfig`."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHXCONFIG"}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        [str(BIN / "torchx"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _assert_two_rank_run(done: subprocess.CompletedProcess, run_dir: Path) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "local_cwd://" in done.stdout  # the app handle: the default scheduler came from .torchxconfig
    results = json.loads((run_dir / "results.json").read_text())
    assert results["training"]["steps"] == 4
    assert results["metrics"]["test"]["model"]["hr@10"] > 0
    # Each of the 2 ranks exported the rows of the sharded tables it holds.
    assert sorted(p.name for p in (run_dir / "model").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]
    # Only rank 0 reports: one results table in the output.
    assert output.count("| model | HR@1") == 1


def test_the_cluster_line_as_typed_resolves_to_the_script_on_local_cwd():
    # `torchx run dist.ddp -j 2x8 trainer/main.py`, dry: 2 nodes x 8 ranks of the script, run in this checkout.
    done = _torchx("run", "--dryrun", "dist.ddp", "-j", "2x8", "trainer/main.py", timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # pformat splits long strings into adjacent literals over several lines: join them back.
    printed = re.sub(r"""['"]\s*\n\s*['"]""", "", done.stdout)
    assert "--nnodes 2 --nproc_per_node 8" in printed
    assert "trainer/main.py trainer/main.py" in printed  # the script, then the path it ignores
    assert f"'cwd': '{ROOT}'" in printed  # local_cwd; local_docker would run an image


@pytest.mark.slow
def test_the_cards_line_as_typed_runs_two_cpu_ranks_with_the_script_path(tmp_path):
    done = _torchx(
        "run", "dist.ddp", "-j", "1x2", "trainer/main.py", "--config", "smoke", f"output_dir={tmp_path}", *TINY
    )
    _assert_two_rank_run(done, tmp_path / "smoke")
    # The exported model serves without sharding.
    top = predict(tmp_path / "smoke", k=3, actors=None, actions=None, exclude_seen=False)
    assert top.height > 0 and sorted(set(top["rank"].to_list())) == [1, 2, 3]


@pytest.mark.slow
def test_the_train_component_runs_trainer_main_as_a_module_on_two_cpu_ranks(tmp_path):
    done = _torchx(
        "run", "launch/components.py:train", "--config", "smoke", "-j", "1x2", f"output_dir={tmp_path}", *TINY
    )
    _assert_two_rank_run(done, tmp_path / "smoke")  # its command line: tests/launch/test_components.py
