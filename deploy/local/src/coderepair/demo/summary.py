"""The demo's ending: held-out pass@1 before and after, the reward curve, the summary.

* `heldout_eval` runs ``coderepair-trainer eval`` (the researchers' own command) on a
  model directory and returns its report; the start model's report is cached next to
  it, keyed by the model's warm-start fingerprint, so repeated demos pay for it once.
* `final_model` turns the trainer's last checkpoint into a policy directory (the
  checkpoint holds weights and config; the tokenizer comes from the start model).
* `save_reward_curve` draws the mean reward of every step (and of the coordinator's
  rollouts over time) as a PNG with matplotlib's non-interactive backend.
* `build_summary` gathers the figures into one JSON-ready dict, `summary.json`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from coderepair.demo.network import DemoError, NetworkState
from coderepair.demo.prepare import DemoPlan

__all__ = ["build_summary", "final_model", "heldout_eval", "save_reward_curve"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def heldout_eval(plan: DemoPlan, model: Path, out: Path, cache_key: str | None = None) -> float:
    """Held-out pass@1 of ``model`` through ``coderepair-trainer eval`` (report to ``out``)."""
    if cache_key is not None and out.is_file():
        cached = json.loads(out.read_text())
        if cached.get("cache_key") == cache_key:
            return float(cached["pass_at"]["pass@1"])
    trainer = Path(sys.executable).with_name("coderepair-trainer")
    argv = [str(trainer), "eval", "--config", str(plan.trainer_toml), "--model", str(model)]
    done = subprocess.run(
        [*argv, "--out", str(out)], capture_output=True, text=True, check=False, timeout=3600
    )
    if done.returncode != 0:
        raise DemoError(
            f"held-out eval of {model} failed (code {done.returncode}):\n{done.stderr[-2000:]}"
        )
    report: dict[str, Any] = json.loads(out.read_text())
    if cache_key is not None:
        report["cache_key"] = cache_key
        out.write_text(json.dumps(report, sort_keys=True) + "\n")
    return float(report["pass_at"]["pass@1"])


def final_model(plan: DemoPlan) -> Path | None:
    """The last checkpoint as a loadable policy directory, or None if no step was made."""
    root = plan.trainer_dir / "checkpoints"
    steps = sorted(p for p in root.glob("step-*") if (p / "trainer_state.pt").is_file())
    if not steps:
        return None
    out = plan.workdir / "run" / "final-model"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for path in plan.start_model.iterdir():
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(path, out / path.name)
    for path in steps[-1].iterdir():
        if path.is_file() and path.name != "trainer_state.pt":
            shutil.copy2(path, out / path.name)
    return out


def save_reward_curve(state: NetworkState, path: Path) -> Path:
    """Mean reward per trainer step, and of accepted rollouts over time, as a PNG."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")  # never a window: the demo opens nothing it was not asked to
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    steps = [int(row.get("step", i + 1)) for i, row in enumerate(state.steps)]
    rewards = [float(row.get("reward/mean", float("nan"))) for row in state.steps]
    left.plot(steps, rewards, marker="o", color="#1f6feb")
    left.set_title("trainer: mean reward of each step's groups")
    left.set_xlabel("step")
    left.set_ylabel("reward")
    left.grid(alpha=0.3)
    series = [
        b for b in state.coordinator.get("rollout_series", []) if b.get("reward_mean") is not None
    ]
    if series:
        t0 = series[0]["start_unix_ms"]
        right.plot(
            [(b["start_unix_ms"] - t0) / 60000 for b in series],
            [b["reward_mean"] for b in series],
            marker=".",
            color="#2da44e",
        )
    right.set_title("coordinator: mean reward of rollouts")
    right.set_xlabel("minutes")
    right.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def build_summary(
    plan: DemoPlan,
    state: NetworkState,
    end_reason: str,
    budget_s: float,
    *,
    pass_before: float | None,
    pass_after: float | None,
    curve: Path | None,
) -> dict[str, Any]:
    """Every headline figure of one demo run."""
    rewards = [float(r["reward/mean"]) for r in state.steps if "reward/mean" in r]
    tenth = max(1, len(rewards) // 4)
    workers = {}
    for name, w in state.workers.items():
        s = w.stats
        workers[name] = {
            "policy_versions": w.versions,
            "engine": s.get("engine", ""),
            "rollouts_generated": int(s.get("rollouts_generated", 0)),
            "rollouts_accepted": int(s.get("rollouts_accepted", 0)),
            "rollouts_rejected": int(s.get("rollouts_rejected", 0)),
            "sandbox_jobs": int(s.get("sandbox_jobs", 0)),
            "tokens_per_second": float(s.get("tokens_per_second", 0.0)),
        }
    outcomes = state.batch_outcomes()
    return {
        "profile": plan.profile.name,
        "sandbox": plan.sandbox,
        "budget_minutes": round(budget_s / 60, 1),
        "elapsed_minutes": round(state.elapsed_s / 60, 2),
        "end_reason": end_reason,
        "trainer_steps": len(state.steps),
        "rollouts_trained": int(state.steps[-1].get("rollouts/trained_total", 0))
        if state.steps
        else 0,
        "policy_versions_published": state.latest_version,
        "rollouts_generated": sum(w["rollouts_generated"] for w in workers.values()),
        "rollouts_accepted": sum(w["rollouts_accepted"] for w in workers.values()),
        "rollouts_rejected": sum(w["rollouts_rejected"] for w in workers.values()),
        "sandbox_jobs": sum(w["sandbox_jobs"] for w in workers.values()),
        "batches": outcomes,
        "audits_done": state.audits_done,
        "audit_verdicts": state.audit_verdicts,
        "reward_per_step": rewards,
        "reward_first_quarter": _mean(rewards[:tenth]),
        "reward_last_quarter": _mean(rewards[-tenth:]),
        "heldout_pass_at_1_before": pass_before,
        "heldout_pass_at_1_after": pass_after,
        "heldout_tasks": plan.facts.get("tasks_heldout"),
        "warm_start": plan.facts.get("warm_start"),
        "workers": workers,
        "reward_curve_png": str(curve) if curve is not None else None,
        "dashboard": plan.dashboard_url,
    }
