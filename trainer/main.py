"""Entry point: parse -> prepare data -> train -> evaluate -> write results.

    python -m trainer.main --config configs/collegemsg.yaml [key=value ...]
    python trainer/main.py --config configs/smoke.yaml loader.batch_size=64

torchx may pass the script path itself as the first argument (a `.torchxconfig`
that sets `script = trainer/main.py`); it is accepted and ignored.

A user error (bad config, bad log, training that diverged) prints one clear line and
exits with status 2; a checkpoint that cannot be written (disk full) prints one line and
exits with status 1, the previous checkpoint intact. No stack trace from deep inside a
library.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run by path (`python trainer/main.py`, as torchx launches it): Python puts trainer/
    # on the path, not the repository root the packages live in. Without this the script
    # only ran where the project was pip-installed.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from configs.loading import ConfigError, config_to_dict, load_config
from configs.schema import ExperimentConfig
from data.prepare import prepare
from data.readers import DataError
from trainer.checkpoint import CheckpointWriteError, latest_checkpoint
from trainer.distributed import Distributed, close_distributed, init_distributed, rank_resources
from trainer.loop import NonFiniteTrainingError, Trainer
from trainer.metrics import MetricsLogger
from trainer.export import export_model
from trainer.run_directory import open_run_directory
from trainer.results import evaluate_baselines, evaluation_queries, markdown_table, write_results

log = logging.getLogger("trainer")
OWN_PACKAGES = ("trainer", "data", "models", "configs", "bench", "launch")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _config_path(name: str) -> Path:
    """`configs/x.yaml`, a path anywhere, or a bare name of a shipped config (`collegemsg`)."""
    path = Path(name)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    return CONFIG_DIR / f"{name}.yaml"


def parse_args(argv: list[str]) -> tuple[Path, list[str]]:
    if argv and argv[0].endswith("main.py") and not argv[0].startswith("-"):
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="trainer.main", description="Train and evaluate a next-target retrieval model.")
    parser.add_argument(
        "--config", default="collegemsg", help="YAML run config, or the name of one in configs/ (default: collegemsg)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loader.batch_size=256")
    args = parser.parse_args(argv)
    return _config_path(args.config), args.overrides + (["train.resume=true"] if args.resume else [])


def run(config: ExperimentConfig, dist: Distributed = Distributed()) -> dict:
    """Prepare, train, evaluate; returns the results written to the run directory.
    On several ranks every rank trains and evaluates; rank 0 alone writes files."""
    run_dir = open_run_directory(config.output_dir, config.name, create=dist.is_main)
    if dist.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))

    start = time.perf_counter()
    prepared = prepare(config.data, out_dir=run_dir / "prepared" if dist.is_main else None)
    summary = prepared.summary()
    sampled = len(evaluation_queries(prepared, "test", config.eval))  # eval.max_queries may sample the actors
    if sampled < summary["evaluated_actors"]:
        summary["evaluable_actors"], summary["evaluated_actors"] = summary["evaluated_actors"], sampled
    log.info(
        "data: %s events, %s actors, %s targets, %s evaluated actors, %s candidates (%.1fs)",
        f"{summary['events']:,}", f"{summary['actors']:,}", f"{summary['targets']:,}",
        f"{summary['evaluated_actors']:,}", f"{summary['candidates']:,}", time.perf_counter() - start,
    )

    metrics = MetricsLogger(run_dir / "tensorboard", enabled=dist.is_main)
    metrics.log_config(config_to_dict(config))
    trainer = Trainer(config, prepared, metrics, dist, run_dir=run_dir)
    if config.train.resume:
        latest = latest_checkpoint(trainer.checkpoint_dir) if trainer.checkpoint_dir is not None else None
        if latest is None:
            log.info("resume: no complete checkpoint under %s; starting afresh", trainer.checkpoint_dir)
        else:
            trainer.load_state_dict(latest)
    try:
        summary_train = trainer.train()
        test = trainer.test()
        export_model(trainer.model, run_dir, dist)
        resources = rank_resources(trainer.model, dist)
        if not dist.is_main:
            return {}
        metrics.log({f"test/{k}": v for k, v in test.items()}, trainer.step)
        metrics.log_hparams(config_to_dict(config), {f"valid_{k}": v for k, v in summary_train.best_valid.items()})
    finally:
        trainer.close()

    baselines = {split: evaluate_baselines(prepared, split, config.baselines, config.eval) for split in ("valid", "test")}
    rows = {"model": test, **baselines["test"]}
    title = (
        f"{config.name}: test split, {summary['evaluated_actors']:,} evaluated actors"
        + (f" (a sample of {summary['evaluable_actors']:,})" if "evaluable_actors" in summary else "") + ", "
        f"{summary['candidates']:,} candidates; model from step {summary_train.best_step} of {summary_train.steps}"
    )
    table = markdown_table(rows, title)
    results = {
        "name": config.name,
        "data": summary,
        "training": {
            "steps": summary_train.steps,
            "best_step": summary_train.best_step,
            "stopped_early": summary_train.stopped_early,
            "train_seconds": summary_train.train_seconds,
            "examples_per_s": summary_train.examples_per_s,
        },
        "resources": resources,
        "metrics": {
            "test": rows,
            "valid": {"model": summary_train.best_valid, **baselines["valid"]},
        },
    }
    write_results(run_dir, results, table)
    print(table)
    print(f"\nresults: {run_dir / 'results.json'}; TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    return results


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
        dist = init_distributed(config.distributed)
        if dist.enabled:
            _configure_logging(dist)
        run(config, dist)
    except (ConfigError, DataError, NonFiniteTrainingError) as e:
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
