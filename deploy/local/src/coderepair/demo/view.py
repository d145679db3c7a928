"""What the demo shows: a live panel of the three roles, or one plain line a few seconds.

`render(state)` builds a rich table from a `NetworkState`: the coordinator's figures
(batches accepted / rejected / voided, audits, policy versions, the dashboard's
address), the trainer's (steps, mean reward of the last step, loss, what it printed
last) and a row per worker (policy version, tokens/s, rollouts, sandbox jobs, the
last rejection). On a terminal it is redrawn by `rich.live.Live`; elsewhere (a pipe,
CI) `plain_line` is printed every few seconds instead, so logs stay readable.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from coderepair.demo.network import NetworkState

__all__ = ["outcomes_text", "plain_line", "render"]


def _reward(step: dict[str, Any]) -> str:
    value = step.get("reward/mean")
    return f"{value:+.3f}" if isinstance(value, int | float) else "-"


def outcomes_text(outcomes: dict[str, int]) -> str:
    """The outcomes as "accepted 5, audit_proof 2, duplicate 1": accepted first."""
    rest = sorted((k, v) for k, v in outcomes.items() if k != "accepted")
    return ", ".join(f"{k} {v}" for k, v in [("accepted", outcomes.get("accepted", 0)), *rest])


def render(state: NetworkState, dashboard_url: str, budget_s: float) -> Group:
    """The live panel."""
    minutes = state.elapsed_s / 60
    head = Text.assemble(
        ("coderepair demo", "bold"),
        f"  {state.phase}  ·  {minutes:.1f} of {budget_s / 60:.0f} min  ·  dashboard ",
        (dashboard_url, "underline"),
    )
    outcomes = state.batch_outcomes()
    roles = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    for column in ("role", "figures"):
        roles.add_column(column)
    roles.add_row(
        "coordinator",
        f"policy v{state.latest_version}  ·  batches {outcomes_text(outcomes)}  ·  "
        f"audits done {state.audits_done}",
    )
    last = state.steps[-1] if state.steps else {}
    roles.add_row(
        "trainer",
        f"steps {len(state.steps)}  ·  reward {_reward(last)}  ·  "
        f"loss {last.get('loss', float('nan')):.4f}  ·  {state.trainer_last_line[-70:]}",
    )
    workers = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("worker", "policy", "tok/s", "rollouts", "accepted", "rejected", "sandbox"):
        workers.add_column(column, justify="right" if column != "worker" else "left")
    workers.add_column("last", overflow="fold")
    for worker in state.workers.values():
        s = worker.stats
        workers.add_row(
            worker.name,
            f"v{worker.policy_version}",
            f"{s.get('tokens_per_second', 0):.1f}",
            str(s.get("rollouts_generated", 0)),
            str(s.get("rollouts_accepted", 0)),
            str(s.get("rollouts_rejected", 0)),
            str(s.get("sandbox_jobs", 0)),
            (s.get("last_rejection") or worker.last_event)[:60],
        )
    return Group(head, roles, workers)


def plain_line(state: NetworkState) -> str:
    """One line of the same figures, for logs."""
    outcomes = state.batch_outcomes()
    last = state.steps[-1] if state.steps else {}
    workers = " ".join(
        f"{w.name}=v{w.policy_version}/{w.stats.get('rollouts_generated', 0)}r"
        for w in state.workers.values()
    )
    return (
        f"[{state.elapsed_s / 60:5.1f} min] {state.phase}: policy v{state.latest_version}, "
        f"batches {outcomes_text(outcomes)}; audits {state.audits_done}; "
        f"trainer step {len(state.steps)} reward {_reward(last)}; {workers}"
    )
