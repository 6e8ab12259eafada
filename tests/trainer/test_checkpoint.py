"""Checkpoints: atomic, the last K kept, and a resumed run continues as if uninterrupted."""

from __future__ import annotations

import hashlib
import itertools
import io
import json
import logging
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from configs.loading import load_config
from data.loader import TrainLoader
from data.prepare import prepare
from bench.faults import RunsCommand
from trainer.checkpoint import (
    CheckpointError,
    _write_manifest,
    complete_checkpoints,
    latest_checkpoint,
    load_best,
    load_checkpoint,
    read_metadata,
    save_best,
    save_checkpoint,
    verified_checkpoint,
    written_config,
)
from trainer.distributed import Distributed
from trainer.loop import NonFiniteTrainingError, Trainer
from trainer.metrics import MetricsLogger

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


def _trainer(tmp_path: Path, **overrides: str) -> Trainer:
    defaults = {"train.max_steps": "12", "train.eval_every_steps": "4", "train.patience": "10",
                "train.keep_checkpoints": "3"}
    config = load_config(CONFIG, [f"{k}={v}" for k, v in {**defaults, **overrides}.items()])
    return Trainer(config, prepare(config.data), MetricsLogger(None, enabled=False), run_dir=tmp_path)


@pytest.mark.parametrize("logq", ["static", "streaming"])
def test_a_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path, logq):
    """Bitwise; with the streaming logQ estimator on, its buckets (model buffers) too."""
    whole = _trainer(tmp_path / "whole", **{"loss.logq_estimator": logq})
    summary = whole.train()
    names = [p.name for p in complete_checkpoints(tmp_path / "whole" / "checkpoints")]
    assert names == ["step-00000004", "step-00000008", "step-00000012"]
    if logq == "streaming":
        estimator = whole.model.in_batch.estimator
        assert int(estimator.step) == 12 and int((estimator.last_seen >= 0).sum()) > 100

    resumed = _trainer(tmp_path / "resumed", **{"loss.logq_estimator": logq})
    resumed.load_state_dict(tmp_path / "whole" / "checkpoints" / "step-00000008")
    assert resumed.step == 8
    resumed_summary = resumed.train()
    assert resumed_summary.steps == summary.steps and resumed_summary.best_step == summary.best_step
    assert resumed_summary.best_valid == summary.best_valid
    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    assert resumed.test() == whole.test()


def test_a_checkpoint_of_the_layout_before_the_table_optimizer_one_still_resumes(tmp_path):
    """Written before trainer/table_optimizer.py (each table optimizer's own state under
    `sparse_optimizers`) and before the loader counted examples (`loader_step`): read as
    it was written, into the same launch mode and batch size."""
    written = _trainer(tmp_path / "old", **{"train.max_steps": "4"})
    written.train()
    state = written.state_dict()
    del state["sparse_optimizer"]
    state["sparse_optimizers"] = {name: opt.state_dict()["state"] for name, opt in written._sparse_optimizers().items()}
    progress = {k: v for k, v in state["progress"].items() if not k.startswith("loader_")}
    progress.update(loader_epoch=torch.tensor(written.loader.epoch), loader_step=torch.tensor(4))
    state["progress"] = progress
    save_checkpoint(tmp_path / "old" / "legacy", 4, state, Distributed(), keep=1)

    resumed = _trainer(tmp_path / "resumed")
    resumed.load_state_dict(tmp_path / "old" / "legacy" / "step-00000004")
    assert resumed.step == 4
    assert resumed.loader.state_dict() == {**written.loader.state_dict(), "examples": 4 * written.loader.batch_size}
    for name, optimizer in resumed._sparse_optimizers().items():
        expected = written._sparse_optimizers()[name].state_dict()["state"][0]
        for key, value in optimizer.state_dict()["state"][0].items():
            assert torch.equal(value, expected[key]) and value.abs().sum() > 0, (name, key)


def test_a_run_resumed_with_another_batch_size_goes_on_at_the_next_unseen_example(tmp_path):
    written = _trainer(tmp_path / "written", **{"train.max_steps": "4"})
    written.train()
    examples = 4 * written.loader.batch_size  # the 4 steps the checkpoint was written after
    resumed = _trainer(tmp_path / "resumed", **{"loader.batch_size": "7"})
    resumed.load_state_dict(tmp_path / "written" / "checkpoints" / "step-00000004")
    assert resumed.loader.state_dict()["examples"] == examples
    batch = next(iter(resumed.loader))
    # The examples right after the ones trained on, in the written run's order.
    epoch = TrainLoader(written.loader.builder, batch_size=1, seed=written.config.seed)
    order = [b.target.item() for b in itertools.islice(iter(epoch), examples + 7)]
    assert batch.target.tolist() == order[examples:]


def test_drawn_examples_that_do_not_fit_the_data_are_refused_and_a_checkpoint_without_them_resumes(tmp_path):
    """A checkpoint says which examples its epoch drew, a partition each (data/loader.py);
    a resume that needs them (here: inside a remainder epoch) refuses bits of another
    size in one line naming the checkpoint and the partition. One written before they
    existed (no bits, no remainder flag) resumes as it did."""
    written = _trainer(tmp_path / "written", **{"train.max_steps": "4"})
    written.train()
    state = written.state_dict()
    part = sorted(state["loader_drawn"])[3]
    state["loader_drawn"][part] = torch.zeros(1, dtype=torch.uint8)
    state["progress"]["loader_remainder"] = torch.tensor(1)
    save_checkpoint(tmp_path / "crafted", 4, state, Distributed(), keep=1)
    with pytest.raises(CheckpointError, match=f"step-00000004: the checkpoint's drawn examples of partition "
                                              f"{int(part.removeprefix('part'))} cover 8 bits"):
        _trainer(tmp_path / "resumed").load_state_dict(tmp_path / "crafted" / "step-00000004")

    state = written.state_dict()
    del state["loader_drawn"], state["progress"]["loader_remainder"]
    save_checkpoint(tmp_path / "before", 4, state, Distributed(), keep=1)
    resumed = _trainer(tmp_path / "resumed")
    resumed.load_state_dict(tmp_path / "before" / "step-00000004")
    assert resumed.loader.state_dict() == written.loader.state_dict()


@pytest.mark.parametrize("written, read, error", [
    ("rowwise_adagrad", "adam", "no 'momentum2' state for table 'target_ids'.*another optim.sparse_optimizer"),
    ("adam", "rowwise_adagrad", "does not load into this model.*momentum1"),
])
def test_a_checkpoint_of_another_sparse_optimizer_is_refused_in_one_line(tmp_path, written, read, error):
    _trainer(tmp_path / "written", **{"train.max_steps": "4", "optim.sparse_optimizer": written}).train()
    resumed = _trainer(tmp_path / "resumed", **{"optim.sparse_optimizer": read})
    with pytest.raises(CheckpointError, match=error):
        resumed.load_state_dict(tmp_path / "written" / "checkpoints" / "step-00000004")


def test_only_the_newest_checkpoints_are_kept_and_a_half_written_one_is_never_read(tmp_path):
    directory = tmp_path / "checkpoints"
    state = {"x": torch.arange(4.0)}
    for step in (1, 2, 3):
        save_checkpoint(directory, step, state, Distributed(), keep=2)
    assert [p.name for p in complete_checkpoints(directory)] == ["step-00000002", "step-00000003"]
    # A write that died half-way: a temporary directory, and a step directory without metadata.
    (directory / ".step-00000004.tmp").mkdir()
    (directory / "step-00000005").mkdir()
    assert latest_checkpoint(directory).name == "step-00000003"
    save_checkpoint(directory, 6, state, Distributed(), keep=2)
    assert not (directory / ".step-00000004.tmp").exists()


@pytest.mark.parametrize(
    "error", [OSError(28, "No space left on device"), PermissionError(13, "Permission denied")], ids=["ENOSPC", "EACCES"]
)
def test_a_failing_write_leaves_the_previous_checkpoint_and_raises(tmp_path, monkeypatch, error):
    # Simulated: chmod cannot make a directory unwritable for root, which CI may be.
    directory = tmp_path / "checkpoints"
    save_checkpoint(directory, 1, {"x": torch.ones(3)}, Distributed(), keep=2)

    def failing_write(*args, **kwargs):
        raise error

    monkeypatch.setattr("trainer.checkpoint.dcp.save", failing_write)
    with pytest.raises(OSError, match=error.strerror):
        save_checkpoint(directory, 2, {"x": torch.zeros(3)}, Distributed(), keep=2)
    assert [p.name for p in complete_checkpoints(directory)] == ["step-00000001"]
    state = {"x": torch.zeros(3)}
    load_checkpoint(directory / "step-00000001", state, Distributed())
    assert torch.equal(state["x"], torch.ones(3))  # the previous checkpoint still reads back whole


def test_a_disk_full_run_stops_with_one_line_keeps_its_checkpoint_and_resumes(tmp_path, monkeypatch, capsys):
    from trainer.main import main

    real_save, calls = dcp.save, []

    def full_at_second_checkpoint(state, checkpoint_id, **kwargs):
        if ".step-" in str(checkpoint_id):  # the step checkpoints (best-model writes pass)
            calls.append(checkpoint_id)
        if len(calls) == 2 and ".step-" in str(checkpoint_id):
            raise OSError(28, "No space left on device")
        return real_save(state, checkpoint_id=checkpoint_id, **kwargs)

    monkeypatch.setattr("trainer.checkpoint.dcp.save", full_at_second_checkpoint)
    args = ["--config", str(CONFIG), f"output_dir={tmp_path}", "train.max_steps=12", "train.eval_every_steps=4",
            "train.patience=10"]
    assert main(args) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert "No space left on device" in err and "step-00000004 is intact" in err and "--resume" in err
    checkpoints = tmp_path / "smoke" / "checkpoints"
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["step-00000004"]
    assert not (tmp_path / "smoke" / "results.json").exists()

    monkeypatch.setattr("trainer.checkpoint.dcp.save", real_save)
    assert main([*args, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().err
    assert (tmp_path / "smoke" / "results.json").exists()


class _NaNAtSteps:
    """Wraps the train task: the loss is NaN at the given steps (counted from 1)."""

    def __init__(self, trainer: Trainer, steps: set[int]) -> None:
        self.trainer, self.task, self.steps = trainer, trainer.task, steps

    def __call__(self, batch, telemetry: bool = True):
        loss, output = self.task(batch, telemetry)
        if self.trainer.step + 1 in self.steps:
            loss = loss * float("nan")
        return loss, output


def test_a_nan_loss_skips_the_step_and_moves_no_parameter(tmp_path):
    trainer = _trainer(tmp_path, **{"train.max_steps": "6", "train.eval_every_steps": "6"})
    trainer.task = _NaNAtSteps(trainer, {3, 4})
    batches = iter(trainer.loader)
    for _ in range(2):
        trainer.train_step(next(batches))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for _ in range(2):
        assert trainer.train_step(next(batches)) == {}
    after = trainer.model.state_dict()
    # Only the step counter of the curriculum moves (the batch is consumed); the tables
    # too stay put: no backward ran.
    assert [k for k, v in before.items() if not torch.equal(after[k], v)] == ["training_step"]
    assert trainer.step == 4 and trainer.nonfinite_steps == 2
    trainer.train_step(next(batches))
    assert trainer.nonfinite_in_a_row == 0
    assert not all(torch.equal(trainer.model.state_dict()[k], v) for k, v in before.items())


def test_too_many_nan_steps_in_a_row_stop_with_a_clear_error_and_keep_the_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, **{"train.max_nonfinite_steps": "3"})
    trainer.task = _NaNAtSteps(trainer, set(range(6, 100)))
    with pytest.raises(NonFiniteTrainingError, match=r"step 8: 3 steps in a row had a non-finite loss"):
        trainer.train()
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step-00000004"]
    restored = _trainer(tmp_path / "again")
    restored.load_state_dict(tmp_path / "checkpoints" / "step-00000004")
    assert restored.step == 4


# ----------------------------------------------------- crafted and damaged checkpoints


def _two_checkpoints(directory: Path) -> None:
    for step in (1, 2):
        save_checkpoint(directory, step, {"x": torch.full((3,), float(step))}, Distributed(), keep=5)


def _rewrite_manifest(path: Path) -> None:
    """What an attacker who can write the directory can do: make the manifest match."""
    _write_manifest(path, int(path.name.split("-")[1]), Distributed())


def test_a_crafted_metadata_runs_nothing_even_with_a_matching_manifest(tmp_path):
    directory, marker = tmp_path / "checkpoints", tmp_path / "marker"
    _two_checkpoints(directory)
    newest = directory / "step-00000002"
    (newest / ".metadata").write_bytes(pickle.dumps(RunsCommand(marker)))
    _rewrite_manifest(newest)
    assert verified_checkpoint(directory, Distributed()) == newest  # the hashes match: only the content can tell
    with pytest.raises(CheckpointError, match=r"\.metadata: refused: it names (posix|os)\.system") as refused:
        load_checkpoint(newest, {"x": torch.zeros(3)}, Distributed())
    assert "\n" not in str(refused.value)
    with pytest.raises(CheckpointError, match="refused"):
        read_metadata(newest)  # the trainer's own look at the metadata (rank RNG keys) is guarded too
    assert not marker.exists()


def test_a_crafted_metadata_with_a_stale_manifest_is_damage_and_resume_falls_back(tmp_path, caplog):
    directory, marker = tmp_path / "checkpoints", tmp_path / "marker"
    _two_checkpoints(directory)
    (directory / "step-00000002" / ".metadata").write_bytes(pickle.dumps(RunsCommand(marker)))
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        chosen = verified_checkpoint(directory, Distributed())
    assert chosen == directory / "step-00000001"
    assert "damaged checkpoint step-00000002: " in caplog.text
    assert "step-00000002/.metadata: " in caplog.text and "the manifest says" in caplog.text
    state = {"x": torch.zeros(3)}
    load_checkpoint(chosen, state, Distributed())
    assert torch.equal(state["x"], torch.ones(3)) and not marker.exists()


def test_metadata_that_steers_an_entry_to_pickled_bytes_is_refused(tmp_path):
    """DCP loads entries its metadata calls bytes with torch.load(weights_only=False): a
    crafted .metadata could point a tensor's entry at a pickle. SafeLoadPlanner refuses."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    directory, marker = tmp_path / "checkpoints", tmp_path / "marker"
    save_checkpoint(directory, 1, {"x": torch.ones(3)}, Distributed(), keep=5)
    path = directory / "step-00000001"
    payload = io.BytesIO()
    torch.save(RunsCommand(marker), payload)
    (path / "evil.distcp").write_bytes(payload.getvalue())
    metadata = read_metadata(path)
    metadata.state_dict_metadata["x"] = BytesStorageMetadata()
    metadata.storage_data = {MetadataIndex("x"): _StorageInfo("evil.distcp", 0, len(payload.getvalue()))}
    metadata.storage_meta = None
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    _rewrite_manifest(path)
    with pytest.raises(CheckpointError, match="refused entry x"):
        load_checkpoint(path, {"x": torch.zeros(3)}, Distributed())
    assert not marker.exists()


def test_metadata_naming_a_shard_outside_the_checkpoint_is_refused(tmp_path):
    directory = tmp_path / "checkpoints"
    save_checkpoint(directory, 1, {"x": torch.ones(3)}, Distributed(), keep=5)
    path = directory / "step-00000001"
    metadata = read_metadata(path)
    for info in metadata.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        read_metadata(path)


def _truncate(path: Path) -> None:
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])


def _zero(path: Path) -> None:
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(bytes(shard.stat().st_size))


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (_truncate, "__0_0.distcp: 10 bytes"),
        (_zero, "__0_0.distcp: contents differ"),
        (lambda p: next(p.glob("*.distcp")).unlink(), "__0_0.distcp: missing"),
        (lambda p: (p / ".metadata").write_bytes(b"garbage"), ".metadata: 7 bytes"),
        (lambda p: (p / "manifest.json").unlink(), "manifest.json: missing"),
        (lambda p: (p / "manifest.json").write_text("{"), "manifest.json: unreadable"),
    ],
    ids=["truncated", "zeroed", "deleted", "garbage-metadata", "no-manifest", "bad-manifest"],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path, caplog, damage, named):
    directory = tmp_path / "checkpoints"
    _two_checkpoints(directory)
    damage(directory / "step-00000002")
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert verified_checkpoint(directory, Distributed()) == directory / "step-00000001"
    assert named in caplog.text and "resuming from step-00000001 instead" in caplog.text
    # ... and when no checkpoint verifies, one line that says what to do.
    damage(directory / "step-00000001")
    with pytest.raises(CheckpointError, match=r"step-00000002: damaged .* no older checkpoint .* --overwrite") as e:
        verified_checkpoint(directory, Distributed())
    assert "\n" not in str(e.value)


def test_keep_checkpoints_never_deletes_the_last_verified_one(tmp_path):
    directory = tmp_path / "checkpoints"
    (directory / "step-99999999").mkdir(parents=True)  # a newer-numbered directory that is no checkpoint
    save_checkpoint(directory, 3, {"x": torch.ones(3)}, Distributed(), keep=1)
    assert (directory / "step-00000003" / "manifest.json").exists()
    assert verified_checkpoint(directory, Distributed()) == directory / "step-00000003"


def test_the_manifest_lists_every_file_with_its_size_and_hash(tmp_path):
    directory = tmp_path / "checkpoints"
    save_checkpoint(directory, 7, {"x": torch.ones(3)}, Distributed(), keep=1, config={"seed": 3})
    path = directory / "step-00000007"
    manifest = json.loads((path / "manifest.json").read_text())
    files = sorted(p.name for p in path.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == files and "config.yaml" in files and manifest["step"] == 7
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert written_config(path) == {"seed": 3}


def test_the_best_model_is_its_own_checkpoint_and_outlives_keep_checkpoints(tmp_path):
    # Learning rates near zero: the first validation (step 4) stays the best.
    slow = {"optim.lr": "1e-12", "optim.sparse_lr": "1e-12", "optim.repeat_lr": "1e-12", "model.dropout": "0.0",
            "train.keep_checkpoints": "1"}
    trainer = _trainer(tmp_path, **slow)
    summary = trainer.train()
    assert summary.best_step == 4 and trainer.best_state is None  # no in-memory copy
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best-00000004", "step-00000012"]
    assert json.loads((tmp_path / "checkpoints" / "step-00000012" / "manifest.json").read_text())["best_step"] == 4
    tested = trainer.test()
    # A run resumed from step 12 (elsewhere) finds the best model beside the checkpoint.
    resumed = _trainer(tmp_path / "elsewhere", **slow)
    resumed.load_state_dict(tmp_path / "checkpoints" / "step-00000012")
    assert resumed.test() == tested


def test_a_step_checkpoint_whose_best_model_is_damaged_does_not_verify(tmp_path, caplog):
    directory = tmp_path / "checkpoints"
    for step in (1, 2):
        save_best(directory, step, {"w": torch.full((2,), float(step))}, Distributed())
        save_checkpoint(directory, step, {"x": torch.ones(1)}, Distributed(), keep=5, best_step=step)
    assert sorted(p.name for p in directory.iterdir()) == ["best-00000001", "best-00000002", "step-00000001",
                                                           "step-00000002"]
    shard = next((directory / "best-00000002").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:5])
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert verified_checkpoint(directory, Distributed()) == directory / "step-00000001"
    assert "its best model" in caplog.text and "best-00000002" in caplog.text
    state = {"w": torch.zeros(2)}
    load_best(directory / "best-00000001", state, Distributed())
    assert torch.equal(state["w"], torch.ones(2))
