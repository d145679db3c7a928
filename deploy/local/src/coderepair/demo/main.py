"""`coderepair demo`: prepare, measure, run the network, measure again, summarise.

The steps read in the order they run:

1. `prepare` the work directory (tasks, models, warm start, keys, configs);
2. held-out pass@1 of the start model (cached across demos);
3. the network (`DemoNetwork`) until the trainer has made its steps, the budget is
   spent or Ctrl-C, with a live view of all three roles;
4. held-out pass@1 of the trained model, the reward curve PNG and ``summary.json``.

A first Ctrl-C stops the network cleanly (workers release their leases) and still
prints the summary; a second one during the final eval skips it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from coderepair.demo.network import DemoNetwork
from coderepair.demo.prepare import DemoPlan, choose_sandbox, prepare
from coderepair.demo.summary import build_summary, final_model, heldout_eval, save_reward_curve
from coderepair.demo.view import plain_line, render

__all__ = ["DemoOptions", "run_demo"]


@dataclass(frozen=True)
class DemoOptions:
    """What `coderepair demo` was asked for (see its --help)."""

    tiny: bool
    workdir: Path
    budget_minutes: float
    workers: int = 2
    max_steps: int | None = None
    engine: str = "auto"
    sandbox: str = "auto"
    live: bool | None = None
    """Rich live view; None: when stdout is a terminal."""


def run_demo(options: DemoOptions, console: Console | None = None) -> dict[str, Any]:
    """The whole demo; returns the summary (also written to ``run/summary.json``)."""
    console = console or Console(highlight=False)
    say = console.print
    sandbox = choose_sandbox() if options.sandbox == "auto" else options.sandbox
    say(
        f"sandbox: {sandbox}"
        + (
            " (a Docker engine answers and the sandbox image is built)"
            if sandbox == "docker"
            else " (no Docker engine or image here: the bubblewrap fallback)"
        )
    )
    plan = prepare(options.workdir, options.tiny, sandbox, say=say, max_steps=options.max_steps)
    say(f"work directory: {plan.workdir}  (logs under {plan.workdir / 'run' / 'logs'})")

    say("held-out pass@1 of the start model ...")
    fingerprint = json.dumps(plan.facts.get("warm_start", {}), sort_keys=True)
    before = heldout_eval(
        plan, plan.start_model, plan.workdir / f"eval-before-{plan.profile.name}.json", fingerprint
    )
    say(f"held-out pass@1 before: {before:.4f}")

    budget_s = options.budget_minutes * 60
    network, end_reason = asyncio.run(_run_network(plan, options, budget_s, console))

    after: float | None = None
    model = final_model(plan)
    if model is not None:
        say("held-out pass@1 of the trained model ... (Ctrl-C skips it)")
        try:
            after = heldout_eval(plan, model, plan.workdir / "run" / "eval-after.json")
            say(f"held-out pass@1 after: {after:.4f}")
        except KeyboardInterrupt:
            say("final eval skipped")
    curve = save_reward_curve(network.state, plan.workdir / "run" / "reward-curve.png")
    summary = build_summary(
        plan, network.state, end_reason, budget_s, pass_before=before, pass_after=after, curve=curve
    )
    (plan.workdir / "run" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(console, summary)
    return summary


async def _run_network(
    plan: DemoPlan, options: DemoOptions, budget_s: float, console: Console
) -> tuple[DemoNetwork, str]:
    from coderepair.protocol.identity import Identity  # noqa: PLC0415

    trainer_key = Identity.load_or_create(plan.workdir / "keys" / "trainer.pem").public_key_hex
    network = DemoNetwork(plan, options.workers, budget_s, trainer_key, engine=options.engine)
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_sigint() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            console.print("Ctrl-C: stopping the network (again to stop at once) ...")
            network.request_stop()
        else:
            raise SystemExit(130)

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    live = options.live if options.live is not None else console.is_terminal
    console.print(f"dashboard: {plan.dashboard_url}  (open it in a browser to watch)")
    try:
        async with network:
            runner = asyncio.create_task(network.run())
            if live:
                with Live(console=console, refresh_per_second=2, transient=False) as view:
                    while not runner.done():
                        view.update(render(network.state, plan.dashboard_url, budget_s))
                        await asyncio.wait({runner}, timeout=0.5)
            else:
                while not runner.done():
                    console.print(plain_line(network.state), soft_wrap=True)
                    await asyncio.wait({runner}, timeout=10.0)
            end_reason = await runner
            console.print(f"network: {end_reason}; stopping it ...")
    finally:
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGINT)
    return network, end_reason


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _print_summary(console: Console, summary: dict[str, Any]) -> None:
    table = Table(title="coderepair demo: summary", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    batches = summary["batches"]
    rows = [
        ("model / sandbox", f"{summary['profile']} / {summary['sandbox']}"),
        ("ended", f"{summary['end_reason']} after {summary['elapsed_minutes']} min"),
        ("trainer steps", summary["trainer_steps"]),
        ("policy versions published", summary["policy_versions_published"]),
        (
            "rollouts",
            f"{summary['rollouts_generated']} generated, {summary['rollouts_accepted']} "
            f"accepted, {summary['rollouts_rejected']} rejected, "
            f"{summary['rollouts_trained']} trained on",
        ),
        ("batches", ", ".join(f"{k} {v}" for k, v in sorted(batches.items())) or "-"),
        ("sandbox verifications / audits", f"{summary['sandbox_jobs']} / {summary['audits_done']}"),
        (
            "mean reward, first → last quarter of steps",
            f"{_fmt(summary['reward_first_quarter'])} → {_fmt(summary['reward_last_quarter'])}",
        ),
        (
            "held-out pass@1, before → after",
            f"{_fmt(summary['heldout_pass_at_1_before'])} → "
            f"{_fmt(summary['heldout_pass_at_1_after'])} "
            f"({summary['heldout_tasks']} tasks)",
        ),
        ("reward curve", summary["reward_curve_png"]),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
