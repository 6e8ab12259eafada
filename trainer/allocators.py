"""Memory a rank has freed goes back to the system, so its resident memory follows what
it holds (its share), not what it once touched.

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

import os

POLARS_JEMALLOC_CONF = "dirty_decay_ms:0,muzzy_decay_ms:0"


def configure() -> None:
    os.environ.setdefault("_RJEM_MALLOC_CONF", POLARS_JEMALLOC_CONF)
