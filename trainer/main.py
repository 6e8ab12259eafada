"""Entry point: parse -> prepare data -> train -> evaluate -> write results.

    python -m trainer.main --config configs/collegemsg.yaml [key=value ...]
    torchx run launch/components.py:train --config smoke -j 1x2     # the same, on 2 ranks

The one path-launch shim: run by path (`python trainer/main.py`, `torchrun
trainer/main.py`, and the card's `torchx run dist.ddp -j 2x8 trainer/main.py`, which
`.torchxconfig` turns into `--script trainer/main.py` with the path passed again as
the first argument), this file puts the repository root on `sys.path` and drops a
first argument that names main.py. `-m trainer.main` (the component) needs neither.

A user error (bad config, bad log, a run directory in use or holding another run, a
checkpoint that is crafted, damaged beyond fallback or written under another config,
training that diverged) prints one clear line and
exits with status 2; a checkpoint that cannot be written (disk full) prints one line and
exits with status 1, the previous checkpoint intact. No stack trace from deep inside a
library.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    # The path-launch shim (module docstring): run by path, Python puts trainer/ on the
    # path, not the repository root the packages live in. Without this the script only
    # ran where the project was pip-installed.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer import allocators  # noqa: E402

if __name__ == "__main__":
    # Before anything heavy is imported: glibc reads its malloc settings once, at start
    # (trainer/allocators.py). Not on import, so tests calling main() keep their process.
    allocators.relaunch_with_glibc_tunables()
# Before the data layer imports polars: freed memory must leave a rank (trainer/allocators.py).
allocators.configure()

import yaml  # noqa: E402

from configs.loading import CONFIG_DIR, ConfigError, config_to_dict, load_config, resolve_config_path  # noqa: F401
from configs.schema import ExperimentConfig
from data.dataset import PreparedDataset, ensure_prepared
from data.prepare import prepare_from_dataset, prepared_directory, resolve_data_path
from data.readers import DataError
from trainer.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    CheckpointWriteError,
    best_of,
    read_metadata,
    verified_checkpoint,
    written_config,
)
from trainer.distributed import (
    Distributed,
    close_distributed,
    current_rss_gb,
    init_distributed,
    peak_rss_gb,
    rank_resources,
)
from trainer.loop import NonFiniteTrainingError, Trainer
from trainer.metrics import MetricsLogger
from trainer.export import export_model
from trainer.run_directory import RunLock, check_fresh_start, config_difference, open_run_directory
from trainer.results import baseline_results, run_results, write_results

log = logging.getLogger("trainer")
OWN_PACKAGES = ("trainer", "data", "models", "configs", "bench", "launch")


def parse_args(argv: list[str]) -> tuple[Path, list[str]]:
    if argv and argv[0].endswith("main.py") and not argv[0].startswith("-"):
        argv = argv[1:]  # the path-launch shim: `dist.ddp ... trainer/main.py` passes the path again
    parser = argparse.ArgumentParser(prog="trainer.main", description="Train and evaluate a next-target retrieval model.")
    parser.add_argument(
        "--config", default="collegemsg", help="YAML run config, or the name of one in configs/ (default: collegemsg)"
    )
    parser.add_argument(
        "--resume", action="store_true",
        help="continue from the run's newest checkpoint that verifies (refused if written under another config)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run in the run directory instead of refusing"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loader.batch_size=256")
    args = parser.parse_intermixed_args(argv)  # flags may come after the overrides too
    flags = (["train.resume=true"] if args.resume else []) + (["train.overwrite=true"] if args.overwrite else [])
    return resolve_config_path(args.config), args.overrides + flags


def run(config: ExperimentConfig, dist: Distributed = Distributed()) -> dict:
    """Prepare, train, evaluate; returns the results written to the run directory.
    On several ranks every rank trains and evaluates; rank 0 alone writes files, holding
    the run directory's lock from start to end."""
    run_dir = open_run_directory(config.output_dir, config.name, create=dist.is_main)
    lock = RunLock(run_dir)
    _on_rank_zero(dist, lock.acquire)
    try:
        return _run_locked(config, dist, run_dir)
    finally:
        if dist.is_main:
            lock.release()


_REFUSALS = {"ConfigError": ConfigError, "CheckpointError": CheckpointError, "DataError": DataError}


def _on_rank_zero(dist: Distributed, action: Callable[[], None]) -> None:
    """Run `action` on rank 0 and raise its refusal (ConfigError, CheckpointError, DataError) on
    every rank alike, so that no rank goes on to wait for one that stopped."""
    _agreed(dist, action if dist.is_main else lambda: None)


def _agreed(dist: Distributed, action: Callable[[], object]) -> object:
    """`action()` on every rank, and the first failure of any rank raised on all of them (a
    rank that failed alone would leave the others waiting in their next collective). A
    user error keeps its kind and line; anything else is raised as it was on its own rank
    and as a RuntimeError naming it on the others."""
    result, failure, own = None, None, None
    try:
        result = action()
    except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
        own = e
        failure = (type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    if not dist.enabled:
        if own is not None:
            raise own
        return result
    failures = dist.gather_objects(failure)
    first = next(((rank, f) for rank, f in enumerate(failures) if f is not None), None)
    if first is None:
        return result
    rank, (kind, message) = first
    if kind in _REFUSALS:
        raise _REFUSALS[kind](message) from None
    if own is not None:
        raise own
    raise RuntimeError(f"rank {rank} failed: {kind}: {message}")


def _resume_point(config: ExperimentConfig, dist: Distributed, run_dir: Path) -> Path | None:
    """The checkpoint to continue from, or None to start afresh. A new run may not mix
    with an earlier one in the same directory (refused, or cleared with --overwrite); a
    resumed one must have been written under the same config, extensions aside."""
    if not config.train.resume:
        _on_rank_zero(dist, lambda: check_fresh_start(run_dir, config.train.overwrite))
        return None
    checkpoint = verified_checkpoint(run_dir / "checkpoints", dist)
    if checkpoint is not None:
        # A crafted .metadata (of the checkpoint or of its best model) is refused here,
        # before any work.
        read_metadata(checkpoint)
        if (best := best_of(checkpoint)) is not None:
            read_metadata(best)
    # Without a checkpoint, a finished run's config.yaml still says what the directory holds.
    written_in = checkpoint if checkpoint is not None else run_dir
    written = written_config(written_in)
    differing = config_difference(written, config_to_dict(config)) if written is not None else []
    if differing:
        shown = "; ".join(differing[:6]) + (f"; and {len(differing) - 6} more" if len(differing) > 6 else "")
        raise ConfigError(
            f"{written_in / CONFIG_FILE}: --resume refused: the run was written under another config ({shown}); "
            "resume with its config, or start over with --overwrite or another name (name=...)"
        )
    if checkpoint is None:
        log.info("resume: no complete checkpoint under %s; starting afresh", run_dir / "checkpoints")
    return checkpoint


def _run_locked(config: ExperimentConfig, dist: Distributed, run_dir: Path) -> dict:
    checkpoint = _resume_point(config, dist, run_dir)
    if dist.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))

    start = time.perf_counter()
    # Rank 0 prepares the dataset if it is missing or stale; then every rank reads its share
    # of it (its partitions' actors, the events that reached them, the global statistics).
    directory = prepared_directory(config.data, config.output_dir, config.name)
    source = resolve_data_path(config.data.path)
    _on_rank_zero(dist, lambda: ensure_prepared(config.data, directory, source))
    # A share damaged in place fails on the rank that reads it: every rank hears of it.
    prepared = _agreed(
        dist, lambda: prepare_from_dataset(PreparedDataset.open(directory), config.data, dist.rank, dist.world_size)
    )
    # Where a rank's memory goes, phase by phase (resident GB after each, and the peak so
    # far; results.json).
    rss_after: dict[str, float] = {}
    _note_memory(rss_after, "data")
    summary = prepared.summary()
    if summary["evaluated_actors"] == 0:
        raise DataError(
            f"{summary['source']}: no evaluated actors: the protocol holds out each actor's last two events, so it "
            f"needs actors with at least 3 events, and no actor of these {summary['events']:,} events has that"
        )
    sampled = min(config.eval.max_queries or summary["evaluated_actors"], summary["evaluated_actors"])
    if sampled < summary["evaluated_actors"]:  # eval.max_queries samples the actors
        summary["evaluable_actors"], summary["evaluated_actors"] = summary["evaluated_actors"], sampled
    log.info(
        "data: %s events, %s actors, %s targets, %s evaluated actors, %s candidates (%.1fs)",
        f"{summary['events']:,}", f"{summary['actors']:,}", f"{summary['targets']:,}",
        f"{summary['evaluated_actors']:,}", f"{summary['candidates']:,}", time.perf_counter() - start,
    )

    metrics = MetricsLogger(run_dir / "tensorboard", enabled=dist.is_main)
    metrics.log_config(config_to_dict(config))
    trainer = Trainer(config, prepared, metrics, dist, run_dir=run_dir)
    _note_memory(rss_after, "model")
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint)
    try:
        summary_train = trainer.train()
        _note_memory(rss_after, "training")
        test = trainer.test()
        _note_memory(rss_after, "test")
        export_model(trainer.model, run_dir, dist)
        _note_memory(rss_after, "export")
        # Every rank ranks its own actors' queries for the baselines too.
        baseline = baseline_results(prepared, config.baselines, config.eval, dist=dist)
        _note_memory(rss_after, "baselines")
        held = prepared.log.num_events + (prepared.incoming_log.height if prepared.incoming_log is not None else 0)
        resources = rank_resources(trainer.model, dist, events_held=held, rss_after=rss_after)
        if not dist.is_main:
            return {}
        metrics.log({f"test/{k}": v for k, v in test.items()}, trainer.step)
        metrics.log_hparams(config_to_dict(config), {f"valid_{k}": v for k, v in summary_train.best_valid.items()})
    finally:
        trainer.close()

    results, table = run_results(config.name, summary, summary_train, test, baseline, resources)
    if trainer.contact_offset is not None:
        results["contact_offset"] = trainer.contact_offset
        table += (f"\n\nContact offset {trainer.contact_offset['chosen']:+g} (logits, on every contact's score), chosen on "
                  "validation NDCG@10 (model.contact_offset_on_validation; results.json has every offset tried).")
    write_results(run_dir, results, table)
    print(table)
    print(f"\nresults: {run_dir / 'results.json'}; TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    return results


def _note_memory(rss_after: dict[str, float], phase: str) -> None:
    """Resident memory at the end of `phase`, and the peak so far, in GB."""
    rss_after.update({phase: current_rss_gb(), f"{phase} (peak)": peak_rss_gb()})


def _configure_logging(dist: Distributed) -> None:
    """Our INFO lines on rank 0, warnings everywhere (libraries log INFO chatter to the
    root logger); on several ranks every line says its rank."""
    rank = f"rank {dist.rank} " if dist.enabled else ""
    # force: importing torch/torchrec already attached a handler to the root logger.
    logging.basicConfig(
        level=logging.WARNING, format=f"%(asctime)s {rank}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
        force=True,
    )
    for package in OWN_PACKAGES:
        logging.getLogger(package).setLevel(logging.INFO if dist.is_main else logging.WARNING)


def _print_error(error: Exception, dist: Distributed) -> None:
    where = f" (rank {dist.rank})" if dist.enabled else ""
    print(f"error{where}: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    _configure_logging(Distributed())

    dist = Distributed()
    try:
        config_path, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        config = load_config(config_path, overrides)
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and not config.train.resume:
            # torchrun restarted the job after a failure: the same command line again, which
            # must continue the run, not be refused as a rerun (or --overwrite it).
            log.info("restart %s of this job: resuming", os.environ["TORCHELASTIC_RESTART_COUNT"])
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, resume=True, overwrite=False))
        dist = init_distributed(config.distributed)
        if dist.enabled:
            _configure_logging(dist)
        run(config, dist)
    except (ConfigError, DataError, CheckpointError, NonFiniteTrainingError) as e:
        _print_error(e, dist)
        return 2
    except CheckpointWriteError as e:  # the machine's fault, not the user's input: status 1
        _print_error(e, dist)
        return 1
    finally:
        close_distributed(dist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
