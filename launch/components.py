"""torchx components: how this project is launched.

    torchx run launch/components.py:train --config smoke -j 1x2 train.max_steps=4
    torchx run launch/components.py:train --help

Run from the repository root: torchx reads `.torchxconfig` there (default scheduler
`local_cwd`; add `-s slurm` or `-s kubernetes` on a cluster) and `local_cwd` starts
`torchrun` from PATH (`source .venv/bin/activate`).

NOTE: torchx reads this file as source and executes it in its own namespace, so it
imports only torchx (never torch, never `__file__`), and the annotations stay real types
(no `from __future__ import annotations`, no `X | None`): torchx's linter and argument
parser read them.
"""

from typing import Dict, List, Optional

import torchx
from torchx import specs
from torchx.components import dist


def train(
    *overrides: str,
    config: str = "collegemsg",
    j: str = "1x2",
    resume: bool = False,
    overwrite: bool = False,
    image: str = torchx.IMAGE,
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Train and evaluate a next-target retrieval model: `-m trainer.main` on every rank, through dist.ddp.

    Example: torchx run launch/components.py:train --config smoke -j 1x2 output_dir=/tmp/runs train.max_steps=4

    Options come first, then the overrides. Rank 0 writes
    OUTPUT_DIR/NAME/ (results.json, checkpoints, the serving export) as
    `python -m trainer.main` does; a run directory that already holds a run needs
    --resume True or --overwrite True.

    Args:
        overrides: dotted config overrides for trainer.main, e.g. output_dir=runs train.max_steps=100; none are needed
        config: YAML run config, or the name of one in configs/ (smoke, collegemsg, ...)
        j: {nnodes}x{nproc_per_node}: 1x2 is two ranks on one node, 2x8 two nodes of eight
        resume: continue from the run's newest checkpoint that verifies (--resume True)
        overwrite: replace an earlier run in the run directory instead of refusing (--overwrite True)
        image: image with this project and its environment (docker, kubernetes); the job's directory on slurm; local_cwd ignores it and runs in the current directory
        h: a registered named resource per node; takes precedence over cpu, gpu and memMB
        cpu: CPUs per node
        gpu: GPUs per node (nproc_per_node must not exceed it)
        memMB: memory per node in MB (every rank imports torch and TorchRec and holds its shards of the tables)
        env: environment variables for every rank, e.g. LOGLEVEL=INFO,OMP_NUM_THREADS=1
        max_retries: how many times the scheduler may retry the job
        mounts: mounts into the job's environment, e.g. type=bind,src=/data,dst=/data (see the scheduler's docs)
    """
    script_args = ["--config", config]
    if resume:
        script_args.append("--resume")
    if overwrite:
        script_args.append("--overwrite")
    return dist.ddp(
        *script_args,
        *overrides,
        m="trainer.main",
        image=image,
        name=f"/{_run_name(config)}",
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=dict(env or {}),  # dist.ddp adds its own variables to the dict it is given: not the caller's
        max_retries=max_retries,
        mounts=mounts,
    )


def _run_name(config: str) -> str:
    """The job's name: the config's file stem (`configs/smoke.yaml` -> `smoke`)."""
    stem = config.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".yaml", ".yml"):
        stem = stem.removesuffix(suffix)
    return stem or "train"
