"""The protocol's seeded Gumbel-max sampler as a vLLM V1 logits processor.

vLLM imports this module by name inside its engine (``LLM(logits_processors=
["coderepair.worker.engines.vllm_sampling:SeededGumbelProcessor"])``), so it must stay
importable on its own and light. It imports vLLM at module level because the class
subclasses vLLM's; the engine (`coderepair.worker.engines.vllm`) imports it only after
vLLM itself imported.

How a token is chosen: every request the engine submits asks vLLM for *greedy* decoding
(``temperature=0``) and carries its seed, sample index and real temperature in
``SamplingParams.extra_args[EXTRA_ARGS_KEY]``. For those rows, `apply` runs the protocol's
sampler (`coderepair.protocol.sampling.sample_tokens`, the very function the HF engine and
the validator use) on vLLM's float32 logits, then overwrites the row with ``-inf``
everywhere except the chosen token, which gets its behaviour logprob
``log_softmax(logits / T)``. vLLM's greedy argmax then picks exactly that token, and with
``logprobs_mode="processed_logits"`` and ``logprobs=0`` it reports that logprob unchanged.
No penalties may be set on these requests: vLLM applies them after the processors.

The position of the sampled token is ``len(prompt) + len(output so far)``, read from the
output list vLLM hands the processor by reference (it holds the tokens generated before
this step). That requires synchronous scheduling, which the engine sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.sample.logits_processor import (  # type: ignore[import-not-found,unused-ignore]
    BatchUpdate,
    LogitsProcessor,
)
from vllm.v1.sample.logits_processor.builtin import (  # type: ignore[import-not-found,unused-ignore]
    process_dict_updates,
)

from coderepair.protocol.sampling import sample_tokens

__all__ = ["EXTRA_ARGS_KEY", "PROCESSOR_QUALNAME", "SeededGumbelProcessor", "request_extra_args"]

EXTRA_ARGS_KEY = "coderepair"
"""Key of ``SamplingParams.extra_args`` holding a row's sampling parameters."""

PROCESSOR_QUALNAME = "coderepair.worker.engines.vllm_sampling:SeededGumbelProcessor"
"""How ``vllm.LLM(logits_processors=[...])`` names the processor."""

# The chosen token's logprob must stay the row's unique maximum even if it underflows.
_FLOAT32_LOWEST = float(torch.finfo(torch.float32).min)


def request_extra_args(
    seed: int, sample_index: int, temperature: float, tag: str
) -> dict[str, dict[str, Any]]:
    """``SamplingParams.extra_args`` for one sample.

    The seed travels as a string: vLLM serialises requests between processes, and a
    uint64 above 2**63 need not survive every serialiser. ``tag`` names the sample for
    the hidden-state capture (`coderepair.worker.engines.vllm_hooks`).
    """
    return {
        EXTRA_ARGS_KEY: {
            "seed": str(seed),
            "sample_index": int(sample_index),
            "temperature": float(temperature),
            "tag": tag,
        }
    }


@dataclass(frozen=True)
class _RowState:
    seed: int
    sample_index: int
    temperature: float
    prompt_len: int
    output: list[int]
    """vLLM's running output list of the request (a live reference)."""


def _new_state(params: Any, prompt_ids: list[int] | None, output: list[int]) -> _RowState | None:
    extra = getattr(params, "extra_args", None) or {}
    spec = extra.get(EXTRA_ARGS_KEY)
    if spec is None:
        return None  # not one of ours: vLLM samples it as usual
    if prompt_ids is None:
        raise ValueError("coderepair sampling needs prompt token ids, not prompt embeddings")
    return _RowState(
        seed=int(spec["seed"]),
        sample_index=int(spec["sample_index"]),
        temperature=float(spec["temperature"]),
        prompt_len=len(prompt_ids),
        output=output,
    )


class SeededGumbelProcessor(LogitsProcessor):  # type: ignore[misc,unused-ignore]
    """Replaces vLLM's sampling of tagged rows by the protocol's seeded sampler."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self._rows: dict[int, _RowState] = {}

    def is_argmax_invariant(self) -> bool:
        # It decides the argmax: it must run before greedy sampling, not only for random.
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._rows, batch_update, _new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return logits
        groups: dict[float, list[tuple[int, _RowState]]] = {}
        for slot, row in self._rows.items():
            groups.setdefault(row.temperature, []).append((slot, row))
        for temperature, members in groups.items():
            members.sort()
            index = torch.tensor([i for i, _ in members], dtype=torch.long, device=logits.device)
            part = logits[index].to(torch.float32)
            chosen = sample_tokens(
                part,
                seed=[row.seed for _, row in members],
                sample_index=[row.sample_index for _, row in members],
                positions=[row.prompt_len + len(row.output) for _, row in members],
                temperature=temperature,
            )
            if temperature == 0.0:
                logprobs = torch.zeros(len(members), dtype=torch.float32, device=logits.device)
            else:
                # Same expression as the HF engine and protocol.sampling.behaviour_logprobs.
                logp = torch.log_softmax(part / temperature, dim=-1)
                logprobs = logp.gather(-1, chosen[:, None])[:, 0].clamp(min=_FLOAT32_LOWEST)
            rows = torch.full_like(part, -math.inf)
            rows.scatter_(-1, chosen[:, None], logprobs[:, None].to(rows.dtype))
            logits[index] = rows.to(logits.dtype)
        return logits
