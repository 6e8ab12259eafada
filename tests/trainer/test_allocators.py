"""A rank's freed memory leaves its resident memory (trainer/allocators.py): polars'
buffers as they are freed, the C heap's holes when the trainer releases them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer.smoke import smoke_trainer
from trainer import allocators, loop

ROOT = Path(__file__).resolve().parents[2]

# Builds and drops a 0.48 GB polars frame; prints how much resident memory stayed (GB).
_PROBE = """
import sys
sys.path.insert(0, {root!r})
if {through_main}:
    import trainer.main  # noqa: F401  (as a rank starts)
import numpy as np
import polars as pl
from trainer.distributed import current_rss_gb
before = current_rss_gb()
frame = pl.DataFrame({{"a": np.arange(30_000_000), "b": np.arange(30_000_000)}})
frame.select((pl.col("a") * 2 + pl.col("b")).sum()).item()
del frame
print(current_rss_gb() - before)
"""


def _kept_gb(through_main: bool) -> float:
    env = {key: value for key, value in os.environ.items() if key != "_RJEM_MALLOC_CONF"}
    probe = _PROBE.format(root=str(ROOT), through_main=through_main)
    out = subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_a_rank_returns_the_polars_buffers_it_freed():
    # Started as trainer.main starts a rank, the dropped frame's memory is returned...
    assert _kept_gb(through_main=True) < 0.05
    # ...which polars' allocator alone does not do (so the check above can fail).
    assert _kept_gb(through_main=False) > 0.15


# GELU (oneDNN) over 500 shapes, as jagged batches give it; prints the resident GB it kept.
_KERNELS_PROBE = """
import sys
sys.path.insert(0, {root!r})
if {through_main}:
    import trainer.main  # noqa: F401  (as a rank starts)
import torch
from trainer.distributed import current_rss_gb
torch.set_num_threads(1)
x = torch.randn(1000, 64)
torch.nn.functional.gelu(x)
before = current_rss_gb()
for rows in range(500, 1000):
    torch.nn.functional.gelu(x[:rows])
print(current_rss_gb() - before)
"""


def _kernels_kept_gb(through_main: bool) -> float:
    env = {key: value for key, value in os.environ.items() if key not in allocators.ONEDNN_CACHE_ENV}
    probe = _KERNELS_PROBE.format(root=str(ROOT), through_main=through_main)
    out = subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN: a torch CPU build with it")
def test_a_rank_keeps_few_compiled_kernels_of_shapes_it_met_once():
    # By default oneDNN keeps all 500 kernels (0.1 GB measured on an Intel Xeon; their
    # size depends on the instruction set)...
    kept_by_default = _kernels_kept_gb(through_main=False)
    assert kept_by_default > 0.01
    # ...and, started as trainer.main starts a rank, a few of them.
    assert _kernels_kept_gb(through_main=True) < kept_by_default / 4


def test_a_users_kernel_cache_setting_wins(monkeypatch):
    for name in (*allocators.ONEDNN_CACHE_ENV, "_RJEM_MALLOC_CONF"):  # configure() sets both; restored after
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DNNL_PRIMITIVE_CACHE_CAPACITY", "1024")  # oneDNN's former name
    allocators.configure()
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ
    monkeypatch.delenv("DNNL_PRIMITIVE_CACHE_CAPACITY")
    allocators.configure()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == allocators.ONEDNN_CACHE_CAPACITY


# Leaves 175 MB of freed 64 KB chunks as holes in glibc's heap, between chunks still
# live (which keep the heap from shrinking at its top, as long-lived objects do in a
# training run); prints the resident GB above the start before and after
# release_free_heap() (the live chunks are 25 MB).
_HOLES = """
import ctypes, sys
sys.path.insert(0, {root!r})
from trainer.allocators import release_free_heap
from trainer.distributed import current_rss_gb
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
before = current_rss_gb()
chunks = [libc.malloc(65536) for _ in range(3200)]
for chunk in chunks:
    ctypes.memset(chunk, 1, 65536)
for i, chunk in enumerate(chunks):
    if i % 8 != 7:
        libc.free(chunk)
held = current_rss_gb() - before
assert release_free_heap()
print(held, current_rss_gb() - before)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or allocators._malloc_trim() is None, reason="glibc's heap: glibc only"
)
def test_released_heap_holes_leave_resident_memory():
    out = subprocess.run([sys.executable, "-c", _HOLES.format(root=str(ROOT))], check=True, capture_output=True, text=True)
    held, after = map(float, out.stdout.split())
    assert held > 0.15  # freed, yet resident: what a training run accumulates
    assert after < 0.05


def test_trainer_releases_memory_on_its_schedule_and_before_each_evaluation(monkeypatch):
    released = []
    trainer = smoke_trainer("train.max_steps=6", "train.eval_every_steps=3", "train.release_memory_every_steps=2")
    monkeypatch.setattr(loop, "release_free_heap", lambda: released.append(trainer.step))
    trainer.train()
    # Steps 2 and 4, and before the validations at steps 3 and 6 (once at step 6).
    assert released == [2, 3, 4, 6]


def test_trainer_never_releases_memory_when_told_not_to(monkeypatch):
    released = []
    trainer = smoke_trainer("train.max_steps=4", "train.eval_every_steps=2", "train.release_memory_every_steps=0")
    monkeypatch.setattr(loop, "release_free_heap", lambda: released.append(trainer.step))
    trainer.train()
    assert released == []


def test_release_free_heap_is_a_no_op_without_glibc(monkeypatch):
    class WithoutMallocTrim:  # a C library as macOS or musl has it
        def __init__(self, name):
            pass

    monkeypatch.setattr(allocators.ctypes, "CDLL", WithoutMallocTrim)
    allocators._malloc_trim.cache_clear()
    try:
        assert allocators.release_free_heap() is False
    finally:
        allocators._malloc_trim.cache_clear()


# --- glibc's tcache and fast bins off, by re-executing the entry point -------------------

_RELAUNCH_PROBE = """
import os, runpy, sys
sys.path.insert(0, {root!r})
print("tunables:", os.environ.get("GLIBC_TUNABLES", ""), flush=True)
sys.argv = ["trainer/main.py", "--help"]
runpy.run_path({main!r}, run_name="__main__")
"""


@pytest.mark.skipif(not allocators._is_glibc(), reason="GLIBC_TUNABLES: glibc only")
def test_the_entry_point_runs_again_with_the_tunables_once():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocators.RELAUNCHED_ENV)}
    env["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=4"  # a user's own tunable is kept
    probe = _RELAUNCH_PROBE.format(root=str(ROOT), main=str(ROOT / "trainer" / "main.py"))
    out = subprocess.run([sys.executable, "-c", probe], env=env, check=False, capture_output=True, text=True)
    # main.py exits with argparse's 0 after --help, in the process image started again.
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("tunables:")]
    assert lines == [
        "tunables: glibc.malloc.arena_max=4",
        f"tunables: glibc.malloc.arena_max=4:{allocators.GLIBC_MALLOC_TUNABLES}",
    ]
    assert "usage:" in out.stdout


@pytest.mark.parametrize(
    ("environ", "glibc", "relaunches"),
    [
        ({}, True, True),
        ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}, True, False),  # the user's choice wins
        ({allocators.RELAUNCHED_ENV: "1"}, True, False),  # never twice, even if glibc ignored them
        ({}, False, False),  # macOS, musl
    ],
)
def test_relaunch_only_where_it_applies(monkeypatch, environ, glibc, relaunches):
    for key in ("GLIBC_TUNABLES", allocators.RELAUNCHED_ENV):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(allocators, "_is_glibc", lambda: glibc)
    calls = []
    monkeypatch.setattr(allocators.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    allocators.relaunch_with_glibc_tunables()
    assert bool(calls) == relaunches
    if calls:
        path, argv, env = calls[0]
        assert path == sys.executable and argv[1:] == sys.orig_argv[1:]
        assert env["GLIBC_TUNABLES"] == allocators.GLIBC_MALLOC_TUNABLES and env[allocators.RELAUNCHED_ENV] == "1"


def test_a_tunable_the_user_set_is_not_overridden(monkeypatch):
    monkeypatch.delenv(allocators.RELAUNCHED_ENV, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mxfast=3")
    monkeypatch.setattr(allocators, "_is_glibc", lambda: True)
    calls = []
    monkeypatch.setattr(allocators.os, "execve", lambda path, argv, env: calls.append(env))
    allocators.relaunch_with_glibc_tunables()
    assert calls[0]["GLIBC_TUNABLES"] == "glibc.malloc.mxfast=3:glibc.malloc.tcache_count=0"
