"""Process-wide tuning of the coordinator's processes (`service.tuning`).

Each case runs in a fresh interpreter: the tuning changes global state (Arrow's default
memory pool, the garbage collector's frozen generation) that would leak into other
tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import gc, json
import pyarrow as pa
from coderepair.coordinator.service.tuning import {function}
before = pa.default_memory_pool().backend_name
backend = {function}()
print(json.dumps({{
    "before": before,
    "returned": backend,
    "after": pa.default_memory_pool().backend_name,
    "frozen": gc.get_freeze_count(),
}}))
"""


def _run(code: str, *args: str, **env: str) -> dict[str, object]:
    base = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _probe(function: str = "tune_serving_process", **env: str) -> dict[str, object]:
    return _run(PROBE.format(function=function), **env)


def test_tuning_moves_arrow_off_mimalloc_and_freezes_the_heap() -> None:
    seen = _probe()
    # mimalloc (these wheels' default) is the pool whose rare 50-120 ms allocations were
    # most of the slow submits on one machine.
    assert seen["after"] in {"jemalloc", "system"}
    assert seen["returned"] == seen["after"]
    assert isinstance(seen["frozen"], int) and seen["frozen"] > 0


def test_a_helper_gets_the_steady_arrow_pool_and_keeps_its_heap_unfrozen() -> None:
    # The helpers encode the Parquet files, so they need the pool; nothing of theirs
    # lives long enough to be worth freezing.
    seen = _probe("tune_helper_process")
    assert seen["after"] in {"jemalloc", "system"} and seen["returned"] == seen["after"]
    assert seen["frozen"] == 0


def test_an_operator_choice_of_arrow_pool_is_kept() -> None:
    seen = _probe(ARROW_DEFAULT_MEMORY_POOL="mimalloc")
    assert seen["before"] == seen["after"] == seen["returned"] == "mimalloc"
    seen = _probe(ARROW_DEFAULT_MEMORY_POOL="system")
    assert seen["before"] == seen["after"] == "system"
