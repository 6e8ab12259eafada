"""User errors end to end: a degenerate log either trains and reports, or stops with one
clear line (exit status 2) before any training, never with a stack trace; so does a run
directory with a link leading out of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.main import main

SMOKE = str(Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml")
FAST = ["train.max_steps=4", "train.eval_every_steps=2", "loader.batch_size=4", "loader.num_rand_negs=2"]


def _run(tmp_path, log_text: str, *overrides: str) -> int:
    path = tmp_path / "log.txt"
    path.write_text(log_text)
    return main(["--config", SMOKE, f"data.path={path}", f"output_dir={tmp_path}", *FAST, *overrides])


def test_a_log_of_one_actor_trains_and_ranks_its_one_evaluated_actor(tmp_path):
    assert _run(tmp_path, "".join(f"1 {t} {t}\n" for t in range(2, 12))) == 0
    results = json.loads((tmp_path / "smoke" / "results.json").read_text())
    assert results["data"]["evaluated_actors"] == 1
    assert 1 <= results["metrics"]["test"]["model"]["mean_rank"] <= results["data"]["candidates"]


@pytest.mark.parametrize(
    ("log_text", "expected"),
    [
        ("1 2 3\n", "no evaluated actors"),  # one event in all
        ("".join(f"{a} {a + 100} {a}\n" for a in range(1, 20)), "no evaluated actors"),  # one event per actor
        ("".join(f"{a} {a + 100} {a}\n{a} {a + 200} {a}\n" for a in range(1, 20)), "no evaluated actors"),  # two
        # Three events per actor: the last two evaluate, the first has no history to train from.
        ("".join(f"{a} {a + d} {a}\n" for a in range(1, 20) for d in (100, 200, 300)), "no training examples"),
        ("".join(f"1 {t} {t}\n" for t in range(2, 12)), "cannot fill one global batch"),  # batch too large
        ("", "the file is empty"),
    ],
)
def test_a_log_too_small_to_train_on_is_one_clear_line(tmp_path, capsys, log_text, expected):
    assert _run(tmp_path, log_text, *(["loader.batch_size=64"] if "global batch" in expected else [])) == 2
    err = capsys.readouterr().err
    assert "\nerror: " in "\n" + err and expected in err.splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "smoke" / "results.json").exists()


def test_a_link_out_of_the_run_directory_is_refused_before_any_work(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    run_dir = tmp_path / "runs" / "smoke"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoints").symlink_to(outside, target_is_directory=True)
    assert main(["--config", SMOKE, f"output_dir={tmp_path / 'runs'}", *FAST]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "checkpoints" in err and "outside the run directory" in err
    assert list(outside.iterdir()) == [] and not (run_dir / "config.yaml").exists()
