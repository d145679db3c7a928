"""Synthetic rollouts: real samples of a model with exact behaviour logprobs, toy rewards.

Tests, `bench/trainer.py` and offline smoke runs need rollout records whose behaviour
logprobs really are the sampling policy's (so that importance ratios start at 1 on the
unchanged model) without running the network. `sample_rollouts` samples ``group_size``
completions per prompt from a Hugging Face causal LM with a seeded generator, records
``log_softmax(logits / T)`` of each sampled token, and scores each completion with a
reward function (by default: the fraction of even token ids — meaningless, but it varies
within a group and a policy can learn it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from coderepair.protocol.rollout import RolloutRecord

__all__ = ["even_token_reward", "sample_rollouts"]

_ZERO_HEX = "0" * 64


def even_token_reward(completion_ids: Sequence[int]) -> float:
    """Fraction of even token ids in the completion (0 for an empty one)."""
    if not completion_ids:
        return 0.0
    return sum(1 for t in completion_ids if t % 2 == 0) / len(completion_ids)


@torch.no_grad()
def sample_rollouts(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    policy_version: int = 0,
    reward_fn: Callable[[Sequence[int]], float] = even_token_reward,
    run_id: str = "synthetic",
) -> list[RolloutRecord]:
    """``len(prompts) * group_size`` records, group by group (lease ``lease-<i>``)."""
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    records: list[RolloutRecord] = []
    try:
        for p, prompt in enumerate(prompts):
            ids = torch.tensor([list(prompt)] * group_size, dtype=torch.long)
            out = model(input_ids=ids, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1, :]
            tokens: list[torch.Tensor] = []
            logprobs: list[torch.Tensor] = []
            for _ in range(max_new_tokens):
                logp = torch.log_softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(logp.exp(), 1, generator=generator)
                tokens.append(nxt.squeeze(-1))
                logprobs.append(logp.gather(-1, nxt).squeeze(-1))
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1, :]
            completion = torch.stack(tokens, dim=1).tolist()
            behaviour = torch.stack(logprobs, dim=1).double().tolist()
            for g in range(group_size):
                records.append(
                    _record(
                        run_id=run_id,
                        prompt_index=p,
                        sample=g,
                        prompt=list(prompt),
                        completion=completion[g],
                        behaviour=behaviour[g],
                        reward_fn=reward_fn,
                        policy_version=policy_version,
                        seed=seed,
                    )
                )
    finally:
        model.train(was_training)
    return records


def _record(
    *,
    run_id: str,
    prompt_index: int,
    sample: int,
    prompt: list[int],
    completion: list[int],
    behaviour: list[float],
    reward_fn: Callable[[Sequence[int]], float],
    policy_version: int,
    seed: int,
) -> RolloutRecord:
    digest = hashlib.sha256(repr((prompt_index, sample, completion)).encode()).hexdigest()
    return RolloutRecord(
        task_id=f"task-{prompt_index}",
        lease_id=f"lease-{policy_version}-{seed}-{prompt_index}",
        run_id=run_id,
        worker_key=_ZERO_HEX,
        policy_version=policy_version,
        sample_index=sample,
        seed=seed,
        prompt_ids=prompt,
        completion_ids=completion,
        behaviour_logprobs=[min(lp, 0.0) for lp in behaviour],
        completion_text="",
        patch="",
        reward=float(reward_fn(completion)),
        reward_components={},
        reward_spec_hash=_ZERO_HEX,
        test_log_sha256=digest,
        proof=b"",
        timings={},
        created_at_ms=0,
    )
