"""Crashes, a hostile network, a full disk and load: nothing acknowledged is lost.

Each scenario of `redteam_faults` runs its own coordinator process with worker
processes that journal (fsynced) every batch the coordinator acknowledged; the
journals are then compared with the database and the object store. Scaled down for CI
(a few workers for ~10 s; load: 50 workers for 20 s); `bench/redteam.py` runs them
longer and with 200 workers for 10 minutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redteam_faults as faults
from redteam_support import World, build_world

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("faults"), n_tasks=64)


def _nothing_lost(figures: dict[str, Any], *, at_least: int = 10) -> None:
    assert figures["acknowledged_batches"] >= at_least, figures
    assert figures["lost_batches"] == 0 and figures["lost_rollouts"] == 0, figures
    assert figures.get("stragglers", 0) == 0, figures


async def test_kill_9_of_the_coordinator_loses_no_acknowledged_rollout(world: World) -> None:
    figures = await faults.coordinator_kill(world, workers=2, seconds=8.0, kills=2)
    _nothing_lost(figures)


async def test_kill_9_of_a_worker_loses_none_of_its_acknowledged_rollouts(world: World) -> None:
    figures = await faults.worker_kill(world, workers=2, seconds=6.0)
    _nothing_lost(figures)


async def test_kill_9_of_the_trainer_skips_and_repeats_no_row(world: World) -> None:
    figures = await faults.trainer_kill(world, workers=2, seconds=6.0, kills=2)
    _nothing_lost(figures)
    assert figures["rows_consumed"] == figures["rows_stored"] > 0, figures
    assert figures["rows_skipped"] == 0 and figures["rows_consumed_twice"] == 0, figures


async def test_a_proxy_that_drops_and_delays_loses_nothing(world: World) -> None:
    figures = await faults.proxy(world, workers=2, seconds=6.0)
    _nothing_lost(figures, at_least=5)
    assert figures["connections_cut"] >= 1, figures


async def test_a_full_object_store_refuses_but_loses_nothing(world: World) -> None:
    figures = await faults.full_disk(world, workers=2, seconds=8.0, size_kib=128)
    if "skipped" in figures:
        pytest.skip(figures["skipped"])
    _nothing_lost(figures)
    assert figures["store_filled"], "the store never filled: lower size_kib"
    assert figures["unreadable_objects"] == 0, figures


async def test_50_workers_for_20_s_get_no_errors(tmp_path: Path) -> None:
    figures = await faults.load(build_world(tmp_path, n_tasks=120), workers=50, seconds=20.0,
                                processes=2, pause_s=1.0)  # fmt: skip
    _nothing_lost(figures, at_least=100)
    assert figures["errors"] == 0 and figures["rejected"] == 0, figures
    assert figures["p99_ms"] is not None and figures["p99_ms"] < 5000, figures
