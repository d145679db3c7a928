"""Process-wide settings for the coordinator's own processes.

The process that serves calls `tune_serving_process` (from `Coordinator.run`), and each
batch-preparing helper `tune_helper_process` (from `service.prepare`). The settings are
process-wide, so the owners of the processes call them, never `Coordinator.start`
(tests start many coordinators in one process).
"""

from __future__ import annotations

import gc
import os

import pyarrow as pa

__all__ = [
    "freeze_startup_heap",
    "steady_arrow_memory_pool",
    "tune_helper_process",
    "tune_serving_process",
]


def tune_serving_process() -> str:
    """Settings for the process that owns a started coordinator: the startup heap
    frozen (`freeze_startup_heap`) and Arrow on a steady memory pool
    (`steady_arrow_memory_pool`, whose backend name is returned). `Coordinator.run`
    (``coderepair-coordinator serve``) calls it."""
    freeze_startup_heap()
    return steady_arrow_memory_pool()


def tune_helper_process() -> str:
    """Settings for a batch-preparing helper (`service.prepare`): it is the process
    that encodes every accepted batch as Parquet, so it gets the steady Arrow pool
    (`steady_arrow_memory_pool`, whose backend name is returned); nothing it holds lives
    long enough to be worth freezing."""
    return steady_arrow_memory_pool()


def steady_arrow_memory_pool() -> str:
    """Make jemalloc (else the system allocator) Arrow's default memory pool, unless
    ``ARROW_DEFAULT_MEMORY_POOL`` names one; returns the backend in use.

    Every accepted batch is encoded as Parquet on the submit path. On one machine,
    Arrow's default mimalloc pool made about one encoding in a thousand take 50-120 ms
    of CPU instead of 2 ms (a few percent of them under the bench's load at 200
    workers), and those were most of the submits slower than 100 ms; on jemalloc or the
    system pool none exceeded 3 ms, at the same median. Another machine showed no such
    stalls on any pool (10 ms at most on mimalloc, 6 on jemalloc): the choice costs
    nothing where mimalloc behaves. bench/coordinator.py ("Parquet encode") measures
    the three pools on the machine it runs on.
    """
    if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        try:
            pool = pa.jemalloc_memory_pool()
        except NotImplementedError:  # an Arrow built without jemalloc
            pool = pa.system_memory_pool()
        pa.set_memory_pool(pool)
    return str(pa.default_memory_pool().backend_name)


def freeze_startup_heap() -> None:
    """Exempt everything alive now (modules, task pools, tokenizer, engine) from the
    cyclic garbage collector: for the process that owns a started coordinator.

    A full (generation 2) collection walks every tracked object. After start-up that is
    mostly the run's task pools and the libraries' own state, none of which ever becomes
    garbage, and one walk paused the event loop for about 100 ms, every few seconds under
    load: the slowest submits of a bench run all queued behind one. Objects created later
    are collected as before.
    """
    gc.collect()
    gc.freeze()
