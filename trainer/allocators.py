"""Memory a rank has freed goes back to the system, so its resident memory follows what
it holds (its share), not what it once touched.

Two allocators hold freed memory: polars' jemalloc (below) and glibc's malloc, where
torch's CPU tensors live. A third cache keeps what it no longer needs: oneDNN's
(the end of this docstring).

glibc: a training step's temporaries change shape with every jagged batch (length-group
blocks, the lookup's ID lists), so the sizes freed by one step rarely fit the next step's
requests. glibc keeps the freed chunks as holes in its heap, touched and resident, and
extends the heap for the misfits: one process on the 1e6-target synthetic log
(configs/synthetic-scale.yaml, `data.path=synthetic:events=1.2e6,actors=1e5,
targets=1e6,cover_targets=true`) grew from 1.10 GB at step 100 to 1.80 GB at step 2,400,
with the memory in use flat. `release_free_heap()` (glibc's `malloc_trim`) hands the
holes' pages back; the trainer calls it every `train.release_memory_every_steps` and
before each evaluation. A fixed mmap threshold (`GLIBC_TUNABLES=glibc.malloc.
mmap_threshold=131072`) also stops the growth, but maps and faults every large
temporary afresh: 0.58x the throughput, where trimming every 50 steps costs about 2%
(README Performance).

polars allocates through its own jemalloc, which keeps freed pages until later polars
work purges them. A rank reads its share with polars and then never calls it again, so
the buffers of that one reading pass (the target statistics' table, the partitions'
columns) stayed resident for the whole run: after reading its share of the 1e7-target
scale log (bench/scale.py, rank 0 of 4) a rank held 1.03 GB above its imports, 0.57 GB
of it such freed buffers (0.46 GB with them returned). With
`dirty_decay_ms:0` they are returned as they are freed; polars is not on the training
path, so nothing slows.

`configure()` must run before polars allocates anything (jemalloc reads its settings
once): trainer/main.py calls it before its first import of the data layer. A user's own
`_RJEM_MALLOC_CONF` wins.

glibc's per-thread cache (tcache) and fast bins hold small freed chunks as "in use",
so they are never merged with their neighbours. torch asks for every tensor with
`posix_memalign`, and glibc's memalign splits the chunk it finds, leaving small
leading and trailing pieces; those pieces go to the tcache and fast bins, get handed to
the next small requests, and pin the large holes around them apart. Traced on rank 0 of
2 (bench/scale.py's log, mallinfo2 after every 10 steps): the heap grew 0.39 GB in 300
steps while the memory in use grew 0.04 GB, and `malloc_trim` every 50 steps took back
only 0.03-0.05 GB each time, as the holes were faulted back in by the next steps. With
both turned off (GLIBC_TUNABLES below) the same run grew 0.21 GB with the tcache off
alone and less with the fast bins off too; bench/scale.py, run back to back: training's
peak 0.30 GB above the model phase instead of 0.42, and 2,773 examples/s against 2,588
(small allocations are no slower here: the batch's tensors are large, Python's small
objects have their own allocator). The tunables are read once, when a process starts,
so the trainer's entry point re-executes itself with them (`relaunch_with_glibc_tunables`,
same PID, arguments and environment otherwise): a rank launched by torchrun, torchx or
by hand gets them alike. A user's own `GLIBC_TUNABLES` naming `glibc.malloc.tcache_count`
wins (`glibc.malloc.tcache_count=7` is glibc's default, i.e. opts out).

oneDNN (inside torch's CPU build; it runs GELU and its gradient) compiles a kernel for
every tensor shape it meets and keeps the last ONEDNN_PRIMITIVE_CACHE_CAPACITY of them
(1,024 by default). A jagged batch's shapes differ at every step, so the cache only
fills: traced on rank 0 of 4 (bench/scale.py's log, mallinfo2 every 20 steps), the
memory in use between steps grew 33 MB over the first 200 steps and then stayed,
and with a capacity of 8 it did not grow; the loss was the same to the last digit, the
throughput within the noise (2,100-2,140 examples/s against 2,110-2,125). A step there
runs about 40 GELU kernels (forward and backward; ONEDNN_VERBOSE, 20 steps), nearly all of new
shapes, so a cache of 16 rebuilds them as the default did: about 0.1 ms each (a probe
over 500 shapes), a few ms of a step of about 250. `configure()` sets the capacity to
ONEDNN_CACHE_CAPACITY unless the user set it (under either of its names); oneDNN reads it
when it builds its first kernel, so any time before the model runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

POLARS_JEMALLOC_CONF = "dirty_decay_ms:0,muzzy_decay_ms:0"
GLIBC_MALLOC_TUNABLES = "glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0"
ONEDNN_CACHE_CAPACITY = "16"
ONEDNN_CACHE_ENV = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")
# Set in the re-executed process: a C library that ignores the tunables (a setuid
# binary, say) must not make the entry point execute itself forever.
RELAUNCHED_ENV = "TRAINER_GLIBC_TUNABLES_SET"


def configure() -> None:
    """Polars' and oneDNN's caching, for this process and the processes it starts (a
    user's own setting wins)."""
    os.environ.setdefault("_RJEM_MALLOC_CONF", POLARS_JEMALLOC_CONF)
    # oneDNN also reads the capacity under its former name; a user's setting of either wins.
    if not any(name in os.environ for name in ONEDNN_CACHE_ENV):
        os.environ[ONEDNN_CACHE_ENV[0]] = ONEDNN_CACHE_CAPACITY


def relaunch_with_glibc_tunables() -> None:
    """Re-execute this process (sys.orig_argv: the same interpreter flags, script or
    module, and arguments) with GLIBC_MALLOC_TUNABLES added to GLIBC_TUNABLES, unless
    the C library is not glibc, the user's GLIBC_TUNABLES sets the tcache already, or
    this process is the re-executed one. For a program's entry point only, before it
    imports anything heavy: it replaces the running process image."""
    if os.environ.get(RELAUNCHED_ENV) or not _is_glibc():
        return
    current = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.tcache_count" in current:
        return
    # glibc takes the last value of a key: a key the user set is not appended after theirs.
    added = [item for item in GLIBC_MALLOC_TUNABLES.split(":") if item.split("=")[0] not in current]
    env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [current, *added])), RELAUNCHED_ENV: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _is_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None where the C library has none (macOS, musl)."""
    # The process's own symbols first (the C library it runs on, found without
    # find_library's ldconfig / gcc lookups, which a slim image may lack).
    libraries = [lambda: ctypes.CDLL(None), lambda: ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")]
    for open_library in libraries:
        try:
            trim = getattr(open_library(), "malloc_trim", None)
        except OSError:
            continue
        if trim is not None:
            trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
            return trim
    log.info("the C library has no malloc_trim (not glibc): freed heap memory is left to it")
    return None


def release_free_heap() -> bool:
    """Return the free pages of glibc's heaps to the system (they stay mapped, and are
    faulted back in when next used). False where the C library cannot (not glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
