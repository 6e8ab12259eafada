"""Fault scenarios of bench/faults.py with real processes: a run SIGKILLed mid-training
resumes from its last complete checkpoint and ends exactly where the uninterrupted run of
the same seed ends, on one process re-run by the user and on 2 torchrun ranks restarted
by torchrun itself."""

from __future__ import annotations

import pytest

from bench.faults import DIRECTORY_SCENARIOS, SCENARIOS, reference_run, run_scenario


def _assert_recovered(result: dict) -> None:
    assert result["recovered"], {k: v for k, v in result.items() if k != "output_tail"} | {
        "output_tail": result.get("output_tail", "")[-1500:]
    }
    assert result["metric_diff"] == 0.0
    assert result["final_checkpoints"] == ["step-00000008", "step-00000016", "step-00000024"]


@pytest.mark.slow
def test_a_killed_run_rerun_with_resume_ends_with_the_uninterrupted_runs_metrics(tmp_path):
    reference = reference_run(1, tmp_path)
    result = run_scenario(SCENARIOS["sigkill_single_process_then_rerun"], tmp_path, reference)
    _assert_recovered(result)
    assert result["exit_statuses"] == [-9, 0]  # killed, then the rerun completed
    assert result["fault_step"] == 12 and result["resumed_from_step"] == 8 and result["steps_lost"] == 4


@pytest.mark.slow
def test_torchrun_restarts_a_job_whose_rank_was_killed_and_it_ends_like_the_uninterrupted_run(tmp_path):
    # Under torchrun's default shared rendezvous store this failed in "Gloo connectFullMesh"
    # until the trainer scoped its keys by restart (trainer/distributed.py).
    reference = reference_run(2, tmp_path)
    result = run_scenario(SCENARIOS["sigkill_rank1_mid_training"], tmp_path, reference)
    _assert_recovered(result)
    assert result["exit_statuses"] == [0] and result["restarts"] == 1
    assert result["fault_step"] == 12 and result["resumed_from_step"] == 8


@pytest.mark.slow
def test_the_run_directory_scenarios_refuse_or_fall_back_and_run_nothing(tmp_path):
    """bench/faults.py's crafted, damaged, rerun, changed-config and concurrent scenarios,
    as real processes on a copy of a finished run."""
    reference = reference_run(1, tmp_path)
    for name in DIRECTORY_SCENARIOS:
        result = run_scenario(SCENARIOS[name], tmp_path, reference)
        assert result["recovered"], (name, result["checks"], result.get("output_tail", "")[-1500:])
        assert result["final_checkpoints"] == ["step-00000008", "step-00000016", "step-00000024"], name
        assert result["metric_diff"] == 0.0, name  # what is left in the directory is the reference run
