"""One run per directory, end to end: a rerun never mixes with the run already there, two
processes never share a directory, and --resume only continues the run it belongs to, from
its newest intact checkpoint, without running anything a crafted checkpoint holds."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.faults import crafted_pickle
from trainer.checkpoint import _write_manifest, complete_checkpoints
from trainer.distributed import Distributed
from trainer.main import main

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
FAST = ["train.max_steps=8", "train.eval_every_steps=4", "train.patience=10", "train.keep_checkpoints=2"]


def _main(tmp_path: Path, *args: str) -> int:
    return main(["--config", SMOKE, f"output_dir={tmp_path}", *FAST, *args])


def _last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def _results(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "smoke" / "results.json").read_text())


def test_a_rerun_without_resume_is_refused_and_overwrite_replaces_the_run(tmp_path, capsys):
    assert _main(tmp_path) == 0
    first = (tmp_path / "smoke" / "results.json").read_bytes()
    checkpoints = [p.name for p in complete_checkpoints(tmp_path / "smoke" / "checkpoints")]
    capsys.readouterr()

    assert _main(tmp_path, "optim.lr=0.002") == 2
    line = _last_error(capsys)
    assert line.startswith("error: ") and "already holds a run" in line
    assert "--resume" in line and "--overwrite" in line and "name=" in line
    # Nothing of the earlier run was touched.
    assert (tmp_path / "smoke" / "results.json").read_bytes() == first
    assert [p.name for p in complete_checkpoints(tmp_path / "smoke" / "checkpoints")] == checkpoints

    assert _main(tmp_path, "optim.lr=0.002", "--overwrite") == 0
    assert (tmp_path / "smoke" / "results.json").read_bytes() != first
    written = (tmp_path / "smoke" / "config.yaml").read_text()
    assert "lr: 0.002" in written
    for checkpoint in complete_checkpoints(tmp_path / "smoke" / "checkpoints"):
        assert "lr: 0.002" in (checkpoint / "config.yaml").read_text()  # no checkpoint of the old run left


def test_resume_refuses_another_config_but_may_extend_the_run(tmp_path, capsys):
    assert _main(tmp_path) == 0
    capsys.readouterr()
    assert _main(tmp_path, "--resume", "model.embedding_dim=32", "loader.batch_size=32") == 2
    line = _last_error(capsys)
    assert "--resume refused" in line and "step-00000008/config.yaml" in line
    assert "model.embedding_dim: 16 -> 32" in line
    # The batch size may change on resume (the loader's position is in examples).
    assert "train.max_steps" not in line and "loader.batch_size" not in line

    # Extending the run is what --resume is for: 8 more steps from the step-8 checkpoint.
    assert _main(tmp_path, "--resume", "train.max_steps=12") == 0
    assert "resumed from" in capsys.readouterr().err
    assert _results(tmp_path)["training"]["steps"] == 12


def test_a_damaged_newest_checkpoint_resumes_from_the_older_one(tmp_path, capsys):
    assert _main(tmp_path, "train.max_steps=12") == 0
    newest = tmp_path / "smoke" / "checkpoints" / "step-00000012"
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    capsys.readouterr()
    assert _main(tmp_path, "train.max_steps=12", "--resume") == 0
    err = capsys.readouterr().err
    assert "damaged checkpoint step-00000012" in err and "resuming from step-00000008" in err
    assert "resumed from" in err and "at step 8" in err


def test_a_crafted_checkpoint_runs_nothing_and_is_refused_in_one_line(tmp_path, capsys):
    marker = tmp_path / "marker"
    assert _main(tmp_path) == 0
    newest = complete_checkpoints(tmp_path / "smoke" / "checkpoints")[-1]
    (newest / ".metadata").write_bytes(crafted_pickle(marker))
    _write_manifest(newest, 8, Distributed())  # the attacker also makes the manifest match
    capsys.readouterr()
    assert _main(tmp_path, "--resume") == 2
    line = _last_error(capsys)
    assert f"{newest}/.metadata: refused" in line and "system" in line
    assert not marker.exists()


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding the run directory's lock, as a concurrent run would."""
    code = (
        "import sys, time; from pathlib import Path; from trainer.run_directory import RunLock; "
        f"RunLock(Path({str(run_dir)!r})).acquire(); print('locked', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_process_on_the_same_run_directory_is_refused_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "smoke"
    run_dir.mkdir()
    holder = _hold_lock(run_dir)
    try:
        assert _main(tmp_path) == 2
        line = _last_error(capsys)
        assert str(run_dir) in line and f"PID {holder.pid}" in line and "another run is using" in line
        assert not (run_dir / "config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the PID stays in the file
        holder.wait()
    assert (run_dir / ".lock").read_text().strip() == str(holder.pid)
    assert _main(tmp_path) == 0
    assert f"took over the lock of PID {holder.pid}" in capsys.readouterr().err
    assert (run_dir / ".lock").read_text() == ""  # released at the end


def test_resume_and_overwrite_together_is_one_clear_line(tmp_path, capsys):
    assert _main(tmp_path, "--resume", "--overwrite") == 2
    assert "set at most one" in _last_error(capsys)


def test_two_runs_started_at_once_on_one_directory_never_mix(tmp_path):
    """Two real processes, started together: one trains, the other refuses in one line."""
    command = [sys.executable, "-m", "trainer.main", "--config", SMOKE, f"output_dir={tmp_path}", *FAST]
    processes = [subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.monotonic() + 300
    outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[1] for p in processes]
    codes = sorted(p.returncode for p in processes)
    assert codes == [0, 2], outputs
    refused = outputs[[p.returncode for p in processes].index(2)]
    last = refused.strip().splitlines()[-1]
    assert ("another run is using" in last or "already holds a run" in last) and "Traceback" not in refused
    results = _results(tmp_path)
    assert results["training"]["steps"] == 8


def test_a_run_that_stopped_before_its_first_checkpoint_does_not_block_the_next(tmp_path, capsys):
    assert _main(tmp_path, "loader.batch_size=100000") == 2  # refused after the data was prepared
    assert "lower loader.batch_size" in _last_error(capsys)
    manifest = tmp_path / "smoke" / "prepared" / "manifest.json"
    prepared_at = manifest.stat().st_mtime_ns
    assert _main(tmp_path) == 0  # its config.yaml and TensorBoard files are replaced, nothing refused
    assert manifest.stat().st_mtime_ns == prepared_at  # the prepared dataset is reused


def test_prepare_first_then_train(tmp_path):
    from data.prepare import main as prepare_main

    assert prepare_main(["--config", SMOKE, f"output_dir={tmp_path}"]) == 0
    assert _main(tmp_path) == 0


def test_a_torchrun_restart_resumes_without_being_told(tmp_path, capsys, monkeypatch):
    """torchrun --max-restarts runs the same command again: it must continue the run."""
    assert _main(tmp_path, "--overwrite") == 0
    capsys.readouterr()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert _main(tmp_path, "--overwrite") == 0
    err = capsys.readouterr().err
    assert "restart 1 of this job: resuming" in err and "resumed from" in err


def test_a_crafted_best_model_metadata_is_refused_before_any_work(tmp_path, capsys):
    marker = tmp_path / "marker"
    assert _main(tmp_path) == 0
    checkpoints = tmp_path / "smoke" / "checkpoints"
    best = sorted(checkpoints.glob("best-*"))[-1]
    (best / ".metadata").write_bytes(crafted_pickle(marker))
    _write_manifest(best, int(best.name.split("-")[1]), Distributed())
    results = (tmp_path / "smoke" / "results.json").read_bytes()
    capsys.readouterr()
    assert _main(tmp_path, "--resume") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "resumed from" not in err  # refused before the model was built
    assert f"{best}/.metadata: refused" in err.strip().splitlines()[-1] and not marker.exists()
    assert (tmp_path / "smoke" / "results.json").read_bytes() == results
