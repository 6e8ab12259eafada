"""Memory a rank has freed goes back to the system, so its resident memory follows what
it holds (its share), not what it once touched.

Two allocators hold freed memory: polars' jemalloc (below) and glibc's malloc, where
torch's CPU tensors live.

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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger(__name__)

POLARS_JEMALLOC_CONF = "dirty_decay_ms:0,muzzy_decay_ms:0"


def configure() -> None:
    os.environ.setdefault("_RJEM_MALLOC_CONF", POLARS_JEMALLOC_CONF)


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
