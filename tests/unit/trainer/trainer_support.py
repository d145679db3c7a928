"""Helpers for the trainer's unit tests: valid rollout records with chosen contents."""

from __future__ import annotations

import random

from coderepair.protocol.rollout import RolloutRecord
from coderepair.trainer.rollouts import SourcedRollout

HEX = "ab" * 32


def record(
    *,
    task: int = 0,
    lease: str = "lease-0",
    sample: int = 0,
    version: int = 0,
    reward: float = 0.0,
    prompt: list[int] | None = None,
    completion: list[int] | None = None,
    logprobs: list[float] | None = None,
) -> RolloutRecord:
    prompt = prompt if prompt is not None else [1, 5, 6]
    completion = completion if completion is not None else [7, 8, 9]
    return RolloutRecord(
        task_id=f"task-{task}",
        lease_id=lease,
        run_id="run",
        worker_key=HEX,
        policy_version=version,
        sample_index=sample,
        seed=0,
        prompt_ids=prompt,
        completion_ids=completion,
        behaviour_logprobs=logprobs if logprobs is not None else [-1.0] * len(completion),
        completion_text="",
        patch="",
        reward=reward,
        reward_components={},
        reward_spec_hash=HEX,
        test_log_sha256=HEX,
        proof=b"",
        timings={},
        created_at_ms=0,
    )


def stream(
    versions: list[int], *, group_size: int = 2, seed: int = 0, vocab: int = 300
) -> list[SourcedRollout]:
    """One group per entry of ``versions`` (that group's policy version), random tokens,
    rewards that differ within each group, cursors 1, 2, ..."""
    rng = random.Random(seed)
    rows: list[SourcedRollout] = []
    for g, version in enumerate(versions):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 5))]
        for s in range(group_size):
            n = rng.randint(1, 5)
            rec = record(
                task=g,
                lease=f"lease-{g}",
                sample=s,
                version=version,
                reward=float(s) + rng.random(),
                prompt=prompt,
                completion=[rng.randrange(3, vocab) for _ in range(n)],
                logprobs=[-rng.uniform(0.5, 6.0) for _ in range(n)],
            )
            rows.append(SourcedRollout(cursor=len(rows) + 1, record=rec, group_size=group_size))
    return rows
