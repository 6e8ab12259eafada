"""Faults: a rank killed mid-training or mid-checkpoint, a full disk, NaN losses. Does
the run recover, how many steps does it lose, and does it end where an uninterrupted run
of the same seed ends?

    .venv/bin/python bench/faults.py                      # every scenario, a few minutes
    .venv/bin/python bench/faults.py --scenarios nan_loss_steps --keep

Every run is configs/smoke.yaml for 24 steps, validating (and checkpointing) every 8,
always started with --resume (which starts afresh when there is no checkpoint):

    sigkill_rank1_mid_training         2 ranks (torchrun --max-restarts 1): rank 1 SIGKILLs
                                       itself after step 12; torchrun restarts both ranks,
                                       they resume from step 8.
    sigkill_rank0_mid_checkpoint       2 ranks: rank 0 SIGKILLs itself inside the step-16
                                       checkpoint write, after DCP has written every file
                                       into `.step-00000016.tmp` but before the rename; the
                                       restarted ranks must resume from step 8, not the .tmp.
    sigkill_single_process_then_rerun  1 process killed after step 12, then the same command
                                       run again (the user re-running with --resume).
    disk_full_on_checkpoint_write      2 ranks (--max-restarts 0): every rank's checkpoint
                                       write of step 16 fails with ENOSPC. The job must stop
                                       with one line naming the intact step-8 checkpoint;
                                       the same command run again then completes.
    nan_loss_steps                     1 process, NaN loss at steps 10-12: skipped, logged,
                                       the run completes (its metrics differ: 3 batches were
                                       never learnt from).
    nan_loss_too_many                  1 process, NaN loss from step 10 on with
                                       train.max_nonfinite_steps=3: stops at step 12 with
                                       exit status 2 and one line; step-00000008 intact.

The run directory's own promises, each on a copy of the finished 1-process reference run
(checkpoints 8, 16, 24), then one command (two for the concurrent case):

    crafted_metadata_resume            the newest checkpoint's .metadata replaced by a pickle
                                       that would `touch` a marker file, its manifest rewritten
                                       to match; --resume must refuse (status 2, one line),
                                       the marker never appear, nothing change.
    damaged_newest_checkpoint_resume   the newest checkpoint's shard truncated to half; --resume
                                       warns naming it, resumes from step 16 and ends with the
                                       reference's metrics (it trains steps 17-24 again).
    rerun_without_resume               the same command without --resume: refused in one line
                                       naming --resume and --overwrite; the run untouched.
    resume_changed_config              --resume with model.embedding_dim=32: refused in one line
                                       naming the key; the run untouched.
    concurrent_run_same_directory      two fresh runs started at once on one run directory: one
                                       trains (the reference's metrics), the other refuses in
                                       one line; the directory holds one run.

Each is compared with an uninterrupted run of the same launcher, seed and arguments (one
2-rank and one 1-process reference). metric_diff is the largest absolute difference over
the model's test metrics and its best validation metrics (results.json); a resumed run
must match within METRIC_TOLERANCE = 0: on CPU with train.deterministic the resumed
state (tables, optimizers, step, loader position, each rank's RNG) makes a resumed run
bit-identical. steps_lost = the step at which the fault struck minus the step the run
resumed from (read from the trainer's "resumed from ... at step N" log line); for the NaN
scenarios, the steps skipped.

The faults are injected by monkeypatching in this same file, run as the worker that
torchrun (or, for one process, this script) starts:

    bench/faults.py --worker <scenario> -- <trainer.main arguments>

A fault fires once per rank: the worker writes its marker file (under $FAULT_DIR) before
firing and never fires when the marker exists, so a restarted or re-run worker runs clean.
Every worker runs with OMP_NUM_THREADS=1. Writes bench/results/faults.json:
{"scenarios": [{"name", "recovered", "steps_lost", "metric_diff", ...}, ...]}.

torchrun's elastic restart and gloo: by default torchrun (torch >= 2.5) shares its
rendezvous TCPStore with the workers, and init_process_group under torchrun adds no
per-attempt prefix to it, so restarted workers can read the gloo addresses the killed
attempt left there and fail in `Gloo connectFullMesh failed ... Connection refused`, or
hang (pytorch/pytorch#135712, #167288). Both elastic-restart scenarios failed that way
until the trainer scoped its process group's keys by the restart count
(trainer/distributed.py `_restart_scoped_store`). They run under torchrun's defaults, as
a user launches; `--no-shared-store` sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for
torchrun (each attempt then gets a fresh store of its own). Which one ran is in faults.json.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCRIPT = Path(__file__).resolve()
CONFIG = "configs/smoke.yaml"
MAX_STEPS, EVAL_EVERY = 24, 8
METRIC_TOLERANCE = 0.0
RUN_TIMEOUT_S = 300  # a launch that takes longer is a hang (a clean one takes under a minute)
TRAIN_OVERRIDES = (
    f"train.max_steps={MAX_STEPS}", f"train.eval_every_steps={EVAL_EVERY}", "train.patience=100",
    "train.keep_checkpoints=3",
)


# ------------------------------------------------------------------ the worker

def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _marker() -> Path:
    return Path(os.environ["FAULT_DIR"]) / f"fired-rank{_rank()}.json"


def _armed() -> bool:
    return not _marker().exists()


def _fire(what: str, step: int, **info) -> bool:
    """True the first time on this rank (the marker is written first, so a fault that
    kills the process still leaves it); False ever after."""
    try:
        fd = os.open(_marker(), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"rank": _rank(), "what": what, "step": step, **info}, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _checkpoint_step(checkpoint_id) -> int:
    """16 from `<run>/checkpoints/.step-00000016.tmp`."""
    found = re.search(r"step-(\d+)", Path(checkpoint_id).name)
    return int(found.group(1)) if found else -1


def _kill_after_step(rank: int, step: int) -> None:
    from trainer.loop import Trainer

    real = Trainer.train_step

    def train_step(self, batch):
        scalars = real(self, batch)
        if self.dist.rank == rank and self.step == step and _fire("SIGKILL after train step", self.step):
            os.kill(os.getpid(), signal.SIGKILL)
        return scalars

    Trainer.train_step = train_step


def _kill_inside_checkpoint(rank: int, step: int) -> None:
    import torch.distributed.checkpoint as dcp

    real = dcp.save

    def save(state, *, checkpoint_id, **kwargs):
        result = real(state, checkpoint_id=checkpoint_id, **kwargs)
        if _rank() == rank and _checkpoint_step(checkpoint_id) == step:
            written = sorted(p.name for p in Path(checkpoint_id).iterdir())
            if _fire("SIGKILL inside the checkpoint write, after dcp.save", step, directory=str(checkpoint_id),
                     files_written=written):
                os.kill(os.getpid(), signal.SIGKILL)
        return result

    dcp.save = save


def _disk_full_at_checkpoint(step: int) -> None:
    import torch.distributed.checkpoint as dcp

    real = dcp.save

    def save(state, *, checkpoint_id, **kwargs):
        if _checkpoint_step(checkpoint_id) == step and _fire("dcp.save raised ENOSPC", step):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(state, checkpoint_id=checkpoint_id, **kwargs)

    dcp.save = save


def _nan_loss(first: int, last: int | None) -> None:
    """The loss is NaN at steps first..last (counted from 1; last None: every later step),
    as tests/trainer/test_checkpoint.py's _NaNAtSteps does it: the train task wrapped."""
    from trainer.loop import Trainer

    real_init = Trainer.__init__

    def __init__(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        if not _armed():
            return
        trainer, task, injected = self, self.task, []

        def nan_task(batch, telemetry: bool = True):
            loss, output = task(batch, telemetry)
            step = trainer.step + 1
            if step >= first and (last is None or step <= last):
                injected.append(step)
                _marker().write_text(json.dumps({"rank": _rank(), "what": "NaN loss", "step": injected[0],
                                                 "steps": injected}))
                loss = loss * float("nan")
            return loss, output

        self.task = nan_task

    Trainer.__init__ = __init__


FAULTS = {
    "none": lambda: None,
    "sigkill_rank1_mid_training": lambda: _kill_after_step(rank=1, step=12),
    "sigkill_rank0_mid_checkpoint": lambda: _kill_inside_checkpoint(rank=0, step=16),
    "sigkill_single_process_then_rerun": lambda: _kill_after_step(rank=0, step=12),
    "disk_full_on_checkpoint_write": lambda: _disk_full_at_checkpoint(step=16),
    "nan_loss_steps": lambda: _nan_loss(10, 12),
    "nan_loss_too_many": lambda: _nan_loss(10, None),
}


def worker(name: str, args: list[str]) -> int:
    """Install fault `name`, then run trainer.main with `args`; its exit status."""
    with open(Path(os.environ["FAULT_DIR"]) / "launches.jsonl", "a") as f:
        f.write(json.dumps({"rank": _rank(), "pid": os.getpid(),
                            "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))}) + "\n")
    FAULTS[name]()
    from trainer.main import main

    return main(args)


# ------------------------------------------------------------ the orchestrator

@dataclass(frozen=True)
class Scenario:
    name: str
    ranks: int
    fault: str
    max_restarts: int = 1
    rerun: bool = False
    """After a first launch that fails, the orchestrator runs the same command again."""
    overrides: tuple[str, ...] = ()

    @property
    def launcher(self) -> str:
        return "torchrun 2 ranks" if self.ranks == 2 else "1 process"


SCENARIOS = {s.name: s for s in [
    Scenario("sigkill_rank1_mid_training", 2, "rank 1 SIGKILLed after train step 12; torchrun restarts the job"),
    Scenario("sigkill_rank0_mid_checkpoint", 2,
             "rank 0 SIGKILLed inside the step-16 checkpoint write (files in .tmp, not renamed); torchrun restarts"),
    Scenario("sigkill_single_process_then_rerun", 1, "SIGKILL after train step 12; the same command run again",
             rerun=True),
    Scenario("disk_full_on_checkpoint_write", 2,
             "every rank's step-16 checkpoint write fails with ENOSPC; the same command run again", max_restarts=0,
             rerun=True),
    Scenario("nan_loss_steps", 1, "NaN loss at steps 10, 11, 12 (max_nonfinite_steps 10)"),
    Scenario("nan_loss_too_many", 1, "NaN loss at every step from 10 (max_nonfinite_steps 3)",
             overrides=("train.max_nonfinite_steps=3",)),
    Scenario("crafted_metadata_resume", 1, "newest .metadata runs a command when unpickled, manifest rewritten; --resume"),
    Scenario("damaged_newest_checkpoint_resume", 1, "newest checkpoint's shard truncated to half; --resume"),
    Scenario("rerun_without_resume", 1, "the finished run's command again, without --resume"),
    Scenario("resume_changed_config", 1, "--resume with model.embedding_dim=32 (the checkpoints have 16)"),
    Scenario("concurrent_run_same_directory", 1, "two fresh runs started at once on one run directory"),
]}
DIRECTORY_SCENARIOS = (
    "crafted_metadata_resume", "damaged_newest_checkpoint_resume", "rerun_without_resume", "resume_changed_config",
    "concurrent_run_same_directory",
)


@dataclass
class Launch:
    status: int | None  # None: timed out (a hang)
    output: str
    seconds: float


@dataclass
class Run:
    """One scenario's (or reference's) launches and what they left behind."""

    run_dir: Path
    fault_dir: Path
    launches: list[Launch] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "\n".join(launch.output for launch in self.launches)

    def results(self) -> dict | None:
        path = self.run_dir / "results.json"
        return json.loads(path.read_text()) if path.exists() else None

    def markers(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.fault_dir.glob("fired-rank*.json"))]

    def elastic_restarts(self) -> int:
        path = self.fault_dir / "launches.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return max((json.loads(line)["restart"] for line in lines), default=0)

    def resumed(self) -> list[tuple[str, int]]:
        return [(path, int(step)) for path, step in re.findall(r"resumed from (\S+) at step (\d+)", self.output)]

    def checkpoints(self) -> tuple[list[str], list[str]]:
        """(complete checkpoints, leftover temporary directories)."""
        from trainer.checkpoint import complete_checkpoints

        directory = self.run_dir / "checkpoints"
        leftovers = sorted(p.name for p in directory.glob(".*")) if directory.is_dir() else []
        return [p.name for p in complete_checkpoints(directory)], leftovers


def _command(name: str, ranks: int, max_restarts: int, trainer_args: list[str]) -> list[str]:
    if ranks == 1:
        return [sys.executable, str(SCRIPT), "--worker", name, "--", *trainer_args]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", str(ranks),
        "--max-restarts", str(max_restarts), str(SCRIPT.relative_to(ROOT)), "--worker", name, "--", *trainer_args,
    ]


LAUNCHER_ENV: dict[str, str] = {}
"""Extra environment of every launch (`--no-shared-store` puts TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 here)."""
RESTART_RACE = "Gloo connectFullMesh failed"


def _stop(process: subprocess.Popen, fault_dir: Path) -> None:
    """End a hung launch and every worker it started: SIGTERM to torchrun (which stops its
    workers), then SIGKILL to its process group and to any worker still alive (torchrun
    starts each in a session of its own; the workers log their pids in launches.jsonl)."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    path = fault_dir / "launches.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        pid = json.loads(line)["pid"]
        with contextlib.suppress(OSError):
            if b"--worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


def _launch_env(fault_dir: Path) -> dict[str, str]:
    """The environment of every launch: no inherited torchrun variables, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "FAULT_DIR": str(fault_dir), **LAUNCHER_ENV,
    })
    return env


def _launch(command: list[str], fault_dir: Path, log: Path) -> Launch:
    """Run `command` to the end (or RUN_TIMEOUT_S: then it and every process it started
    are killed), its output also written to `log`."""
    env = _launch_env(fault_dir)
    start = time.perf_counter()
    with open(log, "w+") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            status = process.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _stop(process, fault_dir)
            status = None
            out.write(f"\n[faults] hung: killed after {RUN_TIMEOUT_S} s\n")
        out.seek(0)
        output = out.read()
    return Launch(status, output, time.perf_counter() - start)


def execute(name: str, fault: str, ranks: int, work_dir: Path, max_restarts: int = 1, rerun: bool = False,
            overrides: tuple[str, ...] = ()) -> Run:
    """Launch `fault` under `name`; with `rerun`, launch the very same command once more
    when the first launch fails."""
    out_dir, fault_dir = work_dir / name / "output", work_dir / name / "fault"
    fault_dir.mkdir(parents=True, exist_ok=True)
    trainer_args = ["--config", CONFIG, f"output_dir={out_dir}", f"name={name}", *TRAIN_OVERRIDES, *overrides,
                    "--resume"]
    command = _command(fault, ranks, max_restarts, trainer_args)
    run = Run(out_dir / name, fault_dir, [_launch(command, fault_dir, work_dir / name / "launch-1.log")])
    if rerun and run.launches[0].status != 0:
        run.launches.append(_launch(command, fault_dir, work_dir / name / "launch-2.log"))
    return run


def reference_run(ranks: int, work_dir: Path) -> dict:
    """The uninterrupted run's results.json (raises if it failed)."""
    run = execute(f"reference_{ranks}", "none", ranks, work_dir)
    results = run.results()
    if run.launches[0].status != 0 or results is None:
        raise RuntimeError(f"the {ranks}-rank reference run failed:\n{run.output[-4000:]}")
    return results


def metric_diff(results: dict, reference: dict) -> tuple[float, str | None]:
    """Largest absolute difference over the model's test metrics and best validation
    metrics, and which metric it is (`test/mean_rank`; None when every one is equal)."""
    diffs = [
        (abs(results["metrics"][split]["model"][key] - value), f"{split}/{key}")
        for split in ("test", "valid")
        for key, value in reference["metrics"][split]["model"].items()
    ]
    worst, name = max(diffs)
    return worst, name if worst > 0 else None


def _error_line(output: str) -> str | None:
    lines = [line for line in output.splitlines() if re.match(r"error( \(rank \d+\))?: ", line)]
    return lines[0] if lines else None


def _last_checkpoint_before(step: int) -> int:
    return (step - 1) // EVAL_EVERY * EVAL_EVERY


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory (the lock file aside), to tell whether a refused
    command changed anything."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"
    }


def run_directory_scenario(scenario: Scenario, work_dir: Path, reference: dict) -> dict:
    """A scenario on a copy of the finished 1-process reference run (or, for the concurrent
    case, on an empty directory): one command, then what it did to the directory."""
    from trainer.checkpoint import _write_manifest, complete_checkpoints
    from trainer.distributed import Distributed

    start = time.perf_counter()
    name, source = "reference_1", work_dir / "reference_1" / "output" / "reference_1"
    out_dir, fault_dir = work_dir / scenario.name / "output", work_dir / scenario.name / "fault"
    fault_dir.mkdir(parents=True, exist_ok=True)
    run_dir, marker = out_dir / name, fault_dir / "crafted-metadata-ran"
    args = ["--config", CONFIG, f"output_dir={out_dir}", f"name={name}", *TRAIN_OVERRIDES]
    checks: dict[str, bool] = {}
    record: dict = {"name": scenario.name, "launcher": scenario.launcher, "fault": scenario.fault, "restarts": 0}

    if scenario.name == "concurrent_run_same_directory":
        command = _command("none", 1, 0, args)
        with contextlib.ExitStack() as stack:
            logs = [stack.enter_context(open(work_dir / scenario.name / f"launch-{i}.log", "w+")) for i in (1, 2)]
            env = _launch_env(fault_dir)
            processes = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                         for log in logs]
            statuses = [p.wait(timeout=RUN_TIMEOUT_S) for p in processes]
            outputs = [(log.seek(0), log.read())[1] for log in logs]
        launches = [Launch(status, output, 0.0) for status, output in zip(statuses, outputs)]
        refused = [launch for launch in launches if launch.status == 2]
        error = _error_line(refused[0].output) if refused else None
        checks["one run trained, the other was refused (statuses 0 and 2)"] = sorted(statuses) == [0, 2]
        checks["the refusal is one line naming the directory's holder or its run"] = error is not None and (
            "another run is using" in error or "already holds a run" in error
        ) and "Traceback" not in refused[0].output
        results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").exists() else None
    else:
        shutil.copytree(source, run_dir)
        (run_dir / ".lock").unlink(missing_ok=True)
        newest = complete_checkpoints(run_dir / "checkpoints")[-1]
        if scenario.name == "crafted_metadata_resume":
            (newest / ".metadata").write_bytes(crafted_pickle(marker))
            _write_manifest(newest, int(newest.name.removeprefix("step-")), Distributed())
        if scenario.name == "damaged_newest_checkpoint_resume":
            shard = next(newest.glob("*.distcp"))
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        before = _snapshot(run_dir)
        extra = {
            "crafted_metadata_resume": ["--resume"], "damaged_newest_checkpoint_resume": ["--resume"],
            "rerun_without_resume": [], "resume_changed_config": ["--resume", "model.embedding_dim=32"],
        }[scenario.name]
        launch = _launch(_command("none", 1, 0, [*args, *extra]), fault_dir, work_dir / scenario.name / "launch-1.log")
        launches, error = [launch], _error_line(launch.output)
        results = json.loads((run_dir / "results.json").read_text())
        if scenario.name == "damaged_newest_checkpoint_resume":
            resumed = re.findall(r"resumed from (\S+) at step (\d+)", launch.output)
            checks["exit status 0"] = launch.status == 0
            checks["warned, naming the damaged checkpoint"] = f"damaged checkpoint {newest.name}" in launch.output
            checks["resumed from step 16, the newest that verifies"] = [int(s) for _, s in resumed] == [16]
            checks[f"metric_diff <= {METRIC_TOLERANCE}"] = metric_diff(results, reference)[0] <= METRIC_TOLERANCE
            record["resumed_from_step"] = int(resumed[0][1]) if resumed else None
        else:
            expected = {
                "crafted_metadata_resume": [".metadata: refused", "system"],
                "rerun_without_resume": ["already holds a run", "--resume", "--overwrite"],
                "resume_changed_config": ["--resume refused", "model.embedding_dim: 16 -> 32"],
            }[scenario.name]
            checks["exit status 2"] = launch.status == 2
            checks[f"one line: {' ... '.join(expected)}"] = error is not None and all(t in error for t in expected)
            checks["no traceback"] = "Traceback" not in launch.output
            checks["the run directory is unchanged"] = _snapshot(run_dir) == before
            record["resumed_from_step"] = None
        if scenario.name == "crafted_metadata_resume":
            checks["the crafted pickle ran nothing"] = not marker.exists()
    record.update({
        "exit_statuses": [launch.status for launch in launches], "relaunches": 0,
        "error": error and error.replace(str(work_dir), "<scratch>"), "steps_lost": None,
        "metric_diff": metric_diff(results, reference)[0] if results is not None else None,
        "recovered": all(checks.values()), "tolerance": METRIC_TOLERANCE,
        "final_checkpoints": [p.name for p in complete_checkpoints(run_dir / "checkpoints")],
        "seconds": round(time.perf_counter() - start, 1), "checks": checks,
    })
    record.setdefault("resumed_from_step", None)
    if not record["recovered"]:
        record["output_tail"] = "\n".join(launch.output for launch in launches)[-3000:]
    return record


class RunsCommand:
    """An object that runs `touch marker` when unpickled by plain pickle.load (or torch.load
    without weights_only): what a crafted checkpoint file would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_pickle(marker: Path) -> bytes:
    """A `.metadata` that runs `touch marker` under plain pickle.load."""
    import pickle

    return pickle.dumps(RunsCommand(marker))


def run_scenario(scenario: Scenario, work_dir: Path, reference: dict) -> dict:
    """Run one scenario; what it did, whether it recovered, and the checks behind that."""
    if scenario.name in DIRECTORY_SCENARIOS:
        return run_directory_scenario(scenario, work_dir, reference)
    start = time.perf_counter()
    run = execute(scenario.name, scenario.name, scenario.ranks, work_dir, scenario.max_restarts, scenario.rerun,
                  scenario.overrides)
    seconds = time.perf_counter() - start
    markers, results = run.markers(), run.results()
    first, final = run.launches[0], run.launches[-1]
    complete, leftovers = run.checkpoints()
    resumed = run.resumed()
    fault_step = min((m["step"] for m in markers), default=None)
    checks: dict[str, bool] = {
        "fault fired": bool(markers),
        "no launch hung": all(launch.status is not None for launch in run.launches),
        "first launch started afresh (--resume, no checkpoint)": "resume: no complete checkpoint" in first.output,
    }
    record: dict = {
        "name": scenario.name, "launcher": scenario.launcher, "fault": scenario.fault,
        "exit_statuses": [launch.status for launch in run.launches],
        "restarts": run.elastic_restarts(), "relaunches": len(run.launches) - 1,
        "fault_step": fault_step,
    }
    resumed_from = resumed[-1][1] if resumed else None
    note = None

    if scenario.name.startswith("nan_"):
        skipped = len(re.findall(r"non-finite loss; step skipped", run.output))
        record["skipped_steps"] = skipped
        record["resumed_from_step"] = None
        if scenario.name == "nan_loss_steps":
            checks["exit status 0"] = final.status == 0
            checks["results.json written"] = results is not None
            checks["3 steps skipped and logged"] = skipped == 3
            record["steps_lost"] = skipped
            note = ("3 batches skipped (no parameter moved on them), so the metrics are expected to differ from the "
                    "uninterrupted run; the difference is reported, not held to the tolerance")
        else:
            error = _error_line(final.output)
            record["error"] = error and error.replace(str(work_dir), "<scratch>")
            checks["exit status 2"] = final.status == 2
            checks["one-line error: non-finite loss"] = error is not None and "steps in a row had a non-finite loss" in error
            checks["no results.json"] = results is None
            checks["step-00000008 complete and the newest"] = complete[-1:] == ["step-00000008"]
            stop = re.search(r"step (\d+): \d+ steps in a row", error or "")
            record["stopped_at_step"] = int(stop.group(1)) if stop else None
            record["last_good_checkpoint"] = complete[-1] if complete else None
            last_good = int(complete[-1].removeprefix("step-")) if complete else 0
            record["steps_lost"] = record["stopped_at_step"] - last_good if stop else None
            note = ("recovered = stopped cleanly (status 2, one line) with the last good checkpoint intact; "
                    "steps_lost = steps from that checkpoint to the stop (a --resume restarts at step 8)")
    else:
        checks["final exit status 0"] = final.status == 0
        checks["results.json written"] = results is not None
        checks["resumed from the last complete checkpoint before the fault"] = (
            fault_step is not None and resumed_from == _last_checkpoint_before(fault_step)
        )
        checks["never loaded a .tmp checkpoint"] = bool(resumed) and all(".tmp" not in path for path, _ in resumed)
        checks["final checkpoints complete, no leftovers"] = (
            complete == [f"step-{s:08d}" for s in (8, 16, 24)] and not leftovers
        )
        if scenario.max_restarts and scenario.ranks > 1:
            checks["torchrun restarted the job once"] = run.elastic_restarts() == 1
        if scenario.rerun:
            checks["first launch failed, the rerun resumed"] = first.status != 0 and len(run.launches) == 2
        if scenario.name == "disk_full_on_checkpoint_write":
            error = _error_line(first.output)
            record["error"] = error and error.replace(str(work_dir), "<scratch>")
            checks["one-line error naming the intact step-8 checkpoint"] = (
                error is not None and "No space left on device" in error and "step-00000008 is intact" in error
            )
            checks["torchrun did not restart (--max-restarts 0)"] = run.elastic_restarts() == 0
            checks["fired on every rank"] = len(markers) == scenario.ranks
        if scenario.name == "sigkill_rank0_mid_checkpoint" and markers:
            record["tmp_files_at_kill"] = markers[0].get("files_written")
        record["resumed_from_step"] = resumed_from
        record["steps_lost"] = fault_step - resumed_from if fault_step is not None and resumed_from is not None else None
    if results is not None:
        record["metric_diff"], record["metric_diff_of"] = metric_diff(results, reference)
        record["steps"] = results["training"]["steps"]
        if not scenario.name.startswith("nan_"):
            checks[f"metric_diff <= {METRIC_TOLERANCE}"] = record["metric_diff"] <= METRIC_TOLERANCE
    else:
        record["metric_diff"] = None
    record.update({
        "recovered": all(checks.values()), "tolerance": METRIC_TOLERANCE, "final_checkpoints": complete,
        "seconds": round(seconds, 1), "checks": checks,
    })
    if note:
        record["note"] = note
    if not record["recovered"]:
        if run.elastic_restarts() and "resumed from" not in run.output and not LAUNCHER_ENV:
            seen = "failed in 'Gloo connectFullMesh'" if RESTART_RACE in run.output else "hung"
            record["diagnosis"] = (
                f"the restarted workers {seen} before resuming: their gloo group read the killed attempt's "
                "addresses from torchrun's shared rendezvous store (pytorch/pytorch#135712); "
                "trainer/distributed.py _restart_scoped_store should keep the attempts apart"
            )
        record["output_tail"] = run.output[-3000:]
    return record


def _table(scenarios: list[dict]) -> str:
    def fmt(v):
        return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))

    lines = [
        "| scenario | launcher | recovered | restarts | relaunches | resumed from | steps lost | metric diff | s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in scenarios:
        lines.append(
            f"| {s['name']} | {s['launcher']} | {s['recovered']} | {s['restarts']} | {s['relaunches']} "
            f"| {fmt(s['resumed_from_step'])} | {fmt(s['steps_lost'])} | {fmt(s['metric_diff'])} | {s['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        name, args = sys.argv[2], sys.argv[3:]
        return worker(name, args[1:] if args[:1] == ["--"] else args)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (its path is printed)")
    parser.add_argument("--no-shared-store", action="store_true",
                        help="launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (see the module docstring)")
    args = parser.parse_args()
    if args.no_shared_store:
        LAUNCHER_ENV["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"

    from bench.common import write_result

    work_dir = Path(tempfile.mkdtemp(prefix="faults-"))
    try:
        start = time.perf_counter()
        chosen = [SCENARIOS[name] for name in args.scenarios]
        references = {ranks: reference_run(ranks, work_dir) for ranks in sorted({s.ranks for s in chosen})}
        scenarios = []
        for scenario in chosen:
            scenarios.append(run_scenario(scenario, work_dir, references[scenario.ranks]))
            print(f"{scenario.name}: recovered {scenarios[-1]['recovered']} ({scenarios[-1]['seconds']:.0f} s)",
                  flush=True)
        figures = {
            "config": CONFIG, "overrides": list(TRAIN_OVERRIDES), "metric_tolerance": METRIC_TOLERANCE,
            "launcher_env": {"OMP_NUM_THREADS": "1", **LAUNCHER_ENV},
            "all_recovered": all(s["recovered"] for s in scenarios), "seconds": round(time.perf_counter() - start, 1),
            "scenarios": scenarios,
        }
        path = write_result("faults", figures)
        print(_table(scenarios))
        for s in scenarios:
            failed = [check for check, ok in s["checks"].items() if not ok]
            if failed:
                print(f"{s['name']}: failed checks: {failed}" + (f"\n  {s['diagnosis']}" if "diagnosis" in s else ""))
        print(f"wrote {path}")
    finally:
        if args.keep:
            print(f"scratch directory kept: {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    return 0 if figures["all_recovered"] else 1


if __name__ == "__main__":
    sys.exit(main())
