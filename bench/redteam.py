"""Red team: cheating workers, crashes and floods, measured in one run.

What runs. A real coordinator (`coderepair-coordinator serve`, SQLite, local object
store, the model auditor holding the tiny model: TOPLOC prefill, sampling replay and the
reward re-run in the coordinator's sandbox) and a population of simulated workers, each a
real process over loopback gRPC with its own Ed25519 key, using the worker's own client
and HF engine (`tests/adversarial/redteam_agents.py`). Some are honest; the others cheat
with one strategy each (`tests/adversarial/redteam_cheats.py`): another model, weights
perturbed by 1 %, a hint added to the prompt, tokens edited after generation, text
injected, best-of-n over seeds, inflated rewards, a wrong patch that "passes" in a
tampered sandbox, replayed batches, completions copied from an honest worker, a stale
policy version, Sybil keys of one operator trying to hold the same task at once,
garbage / oversized payloads, and a key that builds a valid streak (so that BOINC audits
only 1/streak of its batches) and then edits tokens in every batch.

Then the faults, each against its own coordinator with synthetic workers that journal
every acknowledged batch (fsynced) before their next call: kill -9 of the coordinator
(restarted at once), of a worker, of the trainer (restarted from the cursor it
recorded); a TCP proxy that delays traffic and cuts connections; the object store on a
tmpfs that fills up (then grows). Last, load: many keys leasing and submitting, paced
as generating workers, against one coordinator (no model audits).

Figures: per strategy, the share of cheating batches voided or refused and how many
of the strategy's keys were banned (with the most batches any banned key got in);
honest batches and samples wrongly rejected; acknowledged rollouts lost per fault;
load errors and latency percentiles. A table, then one JSON line (the last line).

Run: .venv/bin/python bench/redteam.py [--quick]   (default: the full run, 200 workers
for 10 minutes in the load phase; --quick: grouped processes, fewer batches, 50 workers
for 20 s)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "adversarial"))

import redteam_faults as faults
import redteam_support as rs

# 8 honest keys x 375 batches: 3,000 honest batches, enough to bound their false
# rejection rate under the 0.1 % target with 95 % confidence when none is rejected.
FULL = {"cheat_batches": 12, "honest_keys": 8, "honest_batches": 375, "load_workers": 200,
        "load_seconds": 600.0, "fault_seconds": 20.0, "streak": 14,
        "streak_cheat_batches": 100}  # fmt: skip
QUICK = {"cheat_batches": 4, "honest_keys": 2, "honest_batches": 8, "load_workers": 50,
         "load_seconds": 20.0, "fault_seconds": 10.0, "streak": 12,
         "streak_cheat_batches": 30}  # fmt: skip
# --quick: simulated workers grouped into three processes (each key still its own).
QUICK_GROUPS = (
    (
        "a",
        (
            ("honest", 2),
            ("wrong_model", 1),
            ("perturbed_weights", 1),
            ("hinted_prompt", 1),
            ("edited_tokens", 1),
        ),
    ),
    (
        "b",
        (
            ("injected_text", 1),
            ("best_of_n", 1),
            ("inflated_reward", 1),
            ("tampered_sandbox", 1),
            ("stale_policy", 1),
        ),
    ),
    ("c", (("replayed_batch", 1), ("copied", 1), ("sybil", 3), ("garbage", 1))),
)


async def detection(root: Path, settings: dict[str, Any], quick: bool) -> dict[str, Any]:
    world = rs.build_world(root / "detection", n_tasks=24)
    coordinator = rs.CoordinatorProcess(world, "coordinator", model_audits=True)
    await coordinator.start()
    started = time.monotonic()
    try:
        await coordinator.publish()
        agents = run_population(world, coordinator.address, settings, quick)
        await rs.wait_agents(agents, 3600)
        stored = await rs.wait_audits(coordinator.database_url, 600)
        figures = rs.detection(rs.events(agents), stored)
        figures["_seconds"] = round(time.monotonic() - started, 1)
        figures["_audits_left_pending"] = stored.pending_audits
        return figures
    finally:
        coordinator.stop()


# The streak only grows as batches leave their audit window (600 s in the detection
# phase, where no key gets past 10 and every batch is audited): this attack gets a
# coordinator of its own whose window is short enough for a streak to build in seconds.
STREAK_WINDOW_S = 1.0


async def streak_phase(root: Path, settings: dict[str, Any]) -> dict[str, Any]:
    world = rs.build_world(root / "streak", n_tasks=24)
    coordinator = rs.CoordinatorProcess(
        world, "coordinator", model_audits=True, window_s=STREAK_WINDOW_S
    )
    await coordinator.start()
    try:
        await coordinator.publish()
        agents = [
            rs.spawn(world, coordinator.address, "streak_then_cheat", "streak_then_cheat",
                     batches=settings["streak_cheat_batches"], streak=settings["streak"],
                     seconds=3000.0, replica_tries=30)
        ]  # fmt: skip
        await rs.wait_agents(agents, 3600)
        stored = await rs.wait_audits(coordinator.database_url, 600)
        figures = rs.detection(rs.events(agents), stored)
        return figures.get("streak_then_cheat") or {}
    finally:
        coordinator.stop()


def run_population(
    world: rs.World, address: str, settings: dict[str, Any], quick: bool
) -> list[rs.Agent]:
    cheat, honest = settings["cheat_batches"], settings["honest_batches"]
    common = {"seconds": 3000.0, "replica_tries": 30}
    if quick:
        return [
            rs.spawn(world, address, f"group-{name}", "group", group=group, batches=cheat, **common)
            for name, group in QUICK_GROUPS
        ]
    agents = [
        rs.spawn(world, address, f"honest{i}", "honest", batches=honest, **common)
        for i in range(settings["honest_keys"])
    ]
    for strategy in (*rs.SAMPLE_CHEATS, *rs.LOOP_CHEATS):
        if strategy == "streak_then_cheat":
            continue  # its own phase (`streak_phase`)
        agents.append(
            rs.spawn(
                world,
                address,
                strategy,
                strategy,
                batches=cheat,
                n_keys=3 if strategy == "sybil" else 1,
                **common,
            )
        )
    return agents


async def fault_phase(root: Path, settings: dict[str, Any]) -> dict[str, Any]:
    world = rs.build_world(root / "faults", n_tasks=64)
    seconds = settings["fault_seconds"]
    out = {}
    for name, scenario in (
        ("coordinator_kill9", faults.coordinator_kill),
        ("worker_kill9", faults.worker_kill),
        ("trainer_kill9", faults.trainer_kill),
        ("proxy_drop_delay", faults.proxy),
        ("object_store_full", faults.full_disk),
    ):
        t0 = time.monotonic()
        out[name] = await scenario(world, seconds=seconds)
        out[name]["wall_s"] = round(time.monotonic() - t0, 1)
        print(f"  fault {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


async def load_phase(root: Path, settings: dict[str, Any]) -> dict[str, Any]:
    workers = settings["load_workers"]
    world = rs.build_world(root / "load", n_tasks=workers * 2 + 16)
    return await faults.load(world, workers=workers, seconds=settings["load_seconds"])


def _upper95(failures: int, n: int) -> float | None:
    """One-sided 95 % upper bound of a rate after no failure in n trials (exact:
    1 - 0.05^(1/n)); None when there were failures or no trials (the point rate says it)."""
    if n <= 0 or failures:
        return None
    return float(1.0 - 0.05 ** (1.0 / n))


def print_report(result: dict[str, Any]) -> dict[str, Any]:
    det = result["detection"]
    print("\nRed team: cheating workers (every batch of a fresh key is audited)")
    header = (f"{'strategy':<18} {'batches':>7} {'caught':>7} {'rate':>7} {'banned':>7} "
              f"{'≤ batches':>9}  how caught")  # fmt: skip
    print(header)
    print("-" * len(header))
    summary: dict[str, Any] = {}
    for name in (*rs.SAMPLE_CHEATS, *rs.LOOP_CHEATS):
        fig = det.get(name)
        if not fig:
            print(f"{name:<18} {'(no batch)':>7}")
            summary[name] = None
            continue
        rate = fig["rate"]
        print(
            f"{name:<18} {fig['batches']:>7} {fig['detected']:>7} "
            f"{(rate or 0) * 100:>6.1f}% {fig['keys_banned']:>3}/{fig['keys']:<3} "
            f"{fig['max_batches_before_ban'] or '-':>9}  "
            + ", ".join(f"{k} {v}" for k, v in sorted(fig["how"].items()))
        )
        summary[name] = {
            "batches": fig["batches"], "detected": fig["detected"], "rate": rate,
            "keys": fig["keys"], "keys_banned": fig["keys_banned"],
            "max_batches_before_ban": fig["max_batches_before_ban"],
        }  # fmt: skip
    honest = det.get("honest", {"batches": 0, "detected": 0, "samples": 0, "samples_detected": 0})
    b_rate = honest["detected"] / honest["batches"] if honest["batches"] else None
    s_rate = honest["samples_detected"] / honest["samples"] if honest["samples"] else None
    b_upper = _upper95(honest["detected"], honest["batches"])
    s_upper = _upper95(honest["samples_detected"], honest["samples"])
    print(
        f"{'honest':<18} {honest['batches']:>7} {honest['detected']:>7} "
        f"{(b_rate or 0) * 100:>6.2f}%  false rejections: {honest['detected']} of "
        f"{honest['batches']} batches, {honest['samples_detected']} of {honest['samples']} "
        f"samples ({(s_rate or 0) * 100:.2f} %)"
        + (f"; 95 % upper bounds {b_upper:.2%} per batch, {s_upper:.3%} per sample"
           if b_upper is not None and s_upper is not None else "")
    )  # fmt: skip
    print(f"Sybil: tasks held by two keys of one operator at once: {det['_sybil_replicas_held']}")
    print(
        f"streak_then_cheat: its own coordinator, audit window {STREAK_WINDOW_S} s, so that "
        "BOINC's streak (and 1/streak audit rate) builds before it cheats in every batch"
    )
    print("\nFaults: acknowledged rollouts lost")
    for name, fig in result["faults"].items():
        if "skipped" in fig:
            print(f"  {name:<20} skipped: {fig['skipped']}")
            continue
        extra = {k: v for k, v in fig.items() if k not in ("acknowledged_batches",
                 "acknowledged_rollouts", "lost_batches", "lost_rollouts")}  # fmt: skip
        print(
            f"  {name:<20} acked {fig['acknowledged_batches']:>5} batches "
            f"{fig['acknowledged_rollouts']:>6} rollouts, lost {fig['lost_rollouts']}  {extra}"
        )
    load = result["load"]
    print(
        f"\nLoad: {load['workers']} workers for {load['seconds']} s: "
        f"{load['acknowledged_batches']} batches ({load['batches_per_s']}/s), errors "
        f"{load['errors']}, rejected {load['rejected']}, p50 {load['p50_ms']} ms, "
        f"p99 {load['p99_ms']} ms, lost {load['lost_rollouts']}"
    )
    print(f"\ntotal {result['total_s']:.0f} s ({result['mode']} run)")
    return {
        "mode": result["mode"],
        "detection": summary,
        "honest": {"batches": honest["batches"], "false_rejections": honest["detected"],
                   "batch_rate": b_rate, "samples": honest["samples"],
                   "samples_rejected": honest["samples_detected"], "sample_rate": s_rate,
                   "batch_rate_upper95": b_upper, "sample_rate_upper95": s_upper},
        "sybil_replicas_held": det["_sybil_replicas_held"],
        "faults": {name: {"lost_rollouts": f.get("lost_rollouts"), **f}
                   for name, f in result["faults"].items()},
        "load": load,
        "total_s": round(result["total_s"], 1),
    }  # fmt: skip


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    settings = QUICK if args.quick else FULL
    root = Path(tempfile.mkdtemp(prefix="bench-redteam-"))
    t0 = time.monotonic()
    try:
        result: dict[str, Any] = {"mode": "quick" if args.quick else "full"}
        result["detection"] = await detection(root, settings, args.quick)
        print(f"  detection done in {result['detection']['_seconds']} s", file=sys.stderr)
        result["detection"]["streak_then_cheat"] = await streak_phase(root, settings)
        print("  streak phase done", file=sys.stderr)
        result["faults"] = await fault_phase(root, settings)
        result["load"] = await load_phase(root, settings)
        result["total_s"] = time.monotonic() - t0
        return result
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (minutes)")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder")
    args = parser.parse_args()
    summary = print_report(asyncio.run(main_async(args)))
    print(json.dumps(summary, sort_keys=True, default=str))


if __name__ == "__main__":
    main()
