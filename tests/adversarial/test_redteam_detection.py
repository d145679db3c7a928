"""Cheating workers against a real coordinator with the model auditor: all caught.

Simulated workers (`redteam_agents`, real processes over loopback gRPC, one key each,
the tiny model in the worker's own HF engine) cheat with one strategy each of
`redteam_cheats`, next to honest ones. After the audits have run, every cheating batch
is voided or was refused, every key that cheated through audited batches is banned
within a few batches, and no honest batch was rejected. The strategies are split over
two tests (model and reward cheats; replay, copy, Sybil and garbage), each with its own
coordinator, and the simulated workers of a test share one process (each its own key)
to keep CI within budget; `bench/redteam.py` runs one process per worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from redteam_support import (
    SAMPLE_CHEATS,
    CoordinatorProcess,
    build_world,
    detection,
    events,
    spawn,
    wait_agents,
    wait_audits,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

# Every cheat whose samples are forged is caught by an audit.
AUDITED = SAMPLE_CHEATS


async def _run(tmp_path: Path, group: list[Any], batches: int) -> dict[str, Any]:
    world = build_world(tmp_path / "world", n_tasks=24)
    coordinator = CoordinatorProcess(world, "coordinator", model_audits=True)
    await coordinator.start()
    try:
        await coordinator.publish()
        agent = spawn(world, coordinator.address, "population", "group", group=group,
                      batches=batches, seconds=150.0, replica_tries=30)  # fmt: skip
        await wait_agents([agent], 200)
        stored = await wait_audits(coordinator.database_url, 120)
        assert stored.pending_audits == 0, "audits did not finish"
        return detection(events([agent]), stored)
    finally:
        coordinator.stop()


def _caught_and_banned(
    figures: dict[str, Any], name: str, *, banned: bool, within: int = 4
) -> None:
    fig = figures.get(name)
    assert fig is not None and fig["batches"] >= 2, (name, figures)
    assert fig["detected"] == fig["batches"], (name, fig)
    if banned:
        assert fig["keys_banned"] == fig["keys"], (name, fig)
        assert fig["max_batches_before_ban"] <= within, (name, fig)


def _honest_untouched(figures: dict[str, Any]) -> None:
    honest = figures["honest"]
    assert honest["batches"] >= 3, figures
    assert honest["detected"] == 0, (honest, honest.get("how"))


async def test_model_and_reward_cheats_are_voided_and_their_keys_banned(tmp_path: Path) -> None:
    group = [("honest", 1), *((name, 1) for name in AUDITED), ("stale_policy", 1, 6)]
    figures = await _run(tmp_path, group, batches=3)
    for name in AUDITED:
        _caught_and_banned(figures, name, banned=True)
    # Version-1 work claimed as version 2 fails an audit; claimed as 1, it is refused.
    _caught_and_banned(figures, "stale_policy", banned=True)
    how = set(figures["stale_policy"]["how"])
    assert "rejected:REJECTION_REASON_STALE_POLICY" in how, how
    assert how & {"voided:AUDIT_PROOF", "voided:AUDIT_SAMPLING"}, how
    _honest_untouched(figures)


async def test_replays_copies_sybils_and_garbage_are_refused(tmp_path: Path) -> None:
    group = [("honest", 1, 6), ("replayed_batch", 1, 9), ("copied", 1, 3), ("sybil", 3, 3),
             ("garbage", 1)]  # fmt: skip
    figures = await _run(tmp_path, group, batches=3)
    _caught_and_banned(figures, "copied", banned=False)
    # Signed batches only their key can have sent (malformed, replayed under a new
    # idempotency key) ban it at the 5th (audit.ban_after_malformed); the unsigned or
    # replayed-envelope attempts before them are refused but count against no one.
    _caught_and_banned(figures, "replayed_batch", banned=True, within=9)
    _caught_and_banned(figures, "garbage", banned=True, within=16)
    # One operator's keys never hold the same task at once, and each is banned.
    assert figures["_sybil_replicas_held"] == 0
    _caught_and_banned(figures, "sybil", banned=True)
    # Every kind of garbage was sent; those after the ban met the ban first.
    garbage = figures["garbage"]
    assert garbage["batches"] + garbage["refused_after_ban"] >= 20, garbage
    assert garbage["refused_after_ban"] > 0, garbage
    _honest_untouched(figures)
