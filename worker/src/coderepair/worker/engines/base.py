"""What an inference engine is: load a policy, generate proved samples, take new weights.

Every engine (HF transformers here, vLLM next) produces the same `Generation` for the same
`GenerationRequest`, so the worker loop, the validator and the trainer never care which
engine ran. Three protocol rules make the outputs checkable, and every engine obeys them:

* **Sampling.** Token ``j`` of sample ``i`` is
  ``argmax(float32(logits) + float32(T) * gumbel_noise(seed_i, sample_index_i, p, vocab))``
  with ``p = len(prompt) + j`` (`coderepair.protocol.sampling`). No RNG state anywhere:
  the validator replays it on its own logits.
* **Behaviour logprobs.** ``log_softmax(logits / T)`` of the chosen token, from the very
  logits that were sampled from (what GRPO's importance ratio needs).
* **Proofs.** The last hidden state (the output of the final norm, i.e. the input of
  ``lm_head``) at every position whose logits chose a completion token — prompt position
  ``len(prompt) - 1`` for token 0, the position of token ``j - 1`` for token ``j`` — one
  row per completion token, proved with `build_completion_proofs`: chunks of
  `PROOF_DECODE_BATCHING_SIZE` rows, top-`PROOF_TOPK`, no separate prefill chunk. A
  validator prefills prompt + completion and takes rows
  `completion_rows` ``(len(prompt), len(completion))`` of the same hidden states.
  The prompt itself is chosen by the coordinator and needs no proof of its own; its
  influence reaches every proved row through attention.

How the vLLM engine fits: ``load`` builds ``vllm.LLM`` on the policy directory;
``generate`` submits one vLLM request per sample with ``temperature=0`` (greedy on the
processed logits) and the seed, sample index and temperature in
``SamplingParams.extra_args``, read by a V1 logits processor that adds ``T * g`` and keeps
``log_softmax(logits / T)`` of the chosen token for ``logprobs_mode="processed_logits"``;
the hidden rows come from a forward hook on ``model.model.norm`` installed through
``collective_rpc`` (see DESIGN.md, field notes); ``apply_weights`` goes through
``reload_weights(weights_iterator=...)`` plus ``reset_prefix_cache()``. Nothing in this
interface is HF-specific: requests carry token ids, not text, so both engines see the
same prompt.
"""

from __future__ import annotations

import abc
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from coderepair.protocol import proofs
from coderepair.protocol.errors import ProtocolError

if TYPE_CHECKING:
    import torch

__all__ = [
    "PROOF_DECODE_BATCHING_SIZE",
    "PROOF_TOPK",
    "Engine",
    "EngineError",
    "EngineInputError",
    "EngineNotLoadedError",
    "Generation",
    "GenerationRequest",
    "GenerationTimings",
    "SamplingParams",
    "WeightsError",
    "build_completion_proofs",
    "completion_rows",
]

PROOF_TOPK = proofs.DEFAULT_TOPK
PROOF_DECODE_BATCHING_SIZE = proofs.DEFAULT_DECODE_BATCHING_SIZE

_UINT32 = 1 << 32
_UINT64 = 1 << 64


class EngineError(ProtocolError):
    """The engine cannot do what was asked (no model loaded, model unsuitable, ...)."""


class EngineNotLoadedError(EngineError):
    """``generate`` or ``apply_weights`` was called before ``load``."""


class EngineInputError(EngineError):
    """A request does not fit the loaded model (token ids out of vocabulary, too long)."""


class WeightsError(EngineError):
    """New weights do not fit the loaded model (missing or unknown names, wrong shapes)."""


# ---------------------------------------------------------------- requests


class SamplingParams(BaseModel):
    """How to sample, as named by a lease (one set for all samples of a request)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    temperature: float = Field(ge=0.0, allow_inf_nan=False)
    """Softmax temperature T; 0 means greedy (argmax, logprobs 0 for the chosen tokens)."""
    max_new_tokens: int = Field(ge=1, le=65536)
    """Most tokens generated per sample, the stop token included."""
    stop_token_ids: tuple[int, ...] = ()
    """A sample ends right after producing one of these (end of turn / end of text); the
    stop token is part of the completion. Empty: stop only at ``max_new_tokens``. Use
    ``Engine.stop_token_ids`` for the loaded model's own."""

    @field_validator("stop_token_ids")
    @classmethod
    def _non_negative(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(t < 0 for t in value):
            raise ValueError(f"stop_token_ids must be non-negative token ids, got {value}")
        return value


class GenerationRequest(BaseModel):
    """One prompt and the samples to draw for it (a lease's group of G samples)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    prompt_ids: tuple[int, ...] = Field(min_length=1)
    """The prompt's exact token ids (chat template already applied)."""
    seeds: tuple[int, ...] = Field(min_length=1)
    """One uint64 sampling seed per sample, chosen by the coordinator."""
    sample_indices: tuple[int, ...]
    """One uint32 sample index per sample (the ``i`` of the noise function), as leased."""
    params: SamplingParams
    """Sampling parameters shared by all samples of this request."""

    @model_validator(mode="after")
    def _consistent(self) -> GenerationRequest:
        if len(self.seeds) != len(self.sample_indices):
            raise ValueError(
                f"{len(self.seeds)} seeds but {len(self.sample_indices)} sample indices: "
                "give exactly one sample index per seed"
            )
        if any(not 0 <= s < _UINT64 for s in self.seeds):
            raise ValueError("seeds must be uint64 values (0 <= seed < 2**64)")
        if any(not 0 <= i < _UINT32 for i in self.sample_indices):
            raise ValueError("sample_indices must be uint32 values (0 <= index < 2**32)")
        if any(t < 0 for t in self.prompt_ids):
            raise ValueError("prompt_ids must be non-negative token ids")
        last = len(self.prompt_ids) + self.params.max_new_tokens
        if last > _UINT32:
            raise ValueError("prompt length + max_new_tokens must stay below 2**32 positions")
        return self

    @property
    def group_size(self) -> int:
        return len(self.seeds)


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class GenerationTimings:
    """Wall-clock seconds of the engine batch a sample was generated in (shared by its rows)."""

    prefill_s: float
    decode_s: float
    proof_s: float
    batch_rows: int


@dataclass(frozen=True)
class Generation:
    """One sample: what the worker submits (plus the patch and reward it derives)."""

    request_index: int
    """Index of the request in the ``generate`` call."""
    seed: int
    sample_index: int
    completion_ids: tuple[int, ...]
    """Generated token ids, the stop token included when ``finish_reason == "stop"``."""
    logprobs: tuple[float, ...]
    """Behaviour logprob ``log_softmax(logits / T)[token]`` per completion token."""
    text: str
    """The completion decoded without special tokens."""
    finish_reason: Literal["stop", "length"]
    proofs: tuple[bytes, ...]
    """TOPLOC chunk proofs over the completion's hidden rows (`build_completion_proofs`)."""
    timings: GenerationTimings


def completion_rows(prompt_len: int, completion_len: int) -> slice:
    """The rows of a prefill over prompt + completion whose hidden states are proved.

    Row ``len(prompt) - 1 + j`` produced the logits that chose completion token ``j``; the
    same rows give the logits a validator replays the sampler on.
    """
    if prompt_len < 1 or completion_len < 0:
        raise EngineInputError(
            f"need a non-empty prompt and a non-negative completion length, got "
            f"{prompt_len} and {completion_len}"
        )
    return slice(prompt_len - 1, prompt_len - 1 + completion_len)


def build_completion_proofs(hidden: torch.Tensor | Any) -> list[bytes]:
    """The protocol's proofs of one completion from its hidden rows ([completion_len, H])."""
    return proofs.build_proofs(
        hidden,
        decode_batching_size=PROOF_DECODE_BATCHING_SIZE,
        topk=PROOF_TOPK,
        skip_prefill=True,
    )


# ---------------------------------------------------------------- the interface


class Engine(abc.ABC):
    """An inference engine holding one policy at a time.

    Not thread-safe: one worker loop drives it. ``generate`` returns the samples of all
    requests flattened in order: request 0's samples in the order of its ``seeds``, then
    request 1's, and so on.
    """

    name: str = "engine"
    """Short name shown to the user (``hf``, ``vllm``)."""

    _THROUGHPUT_WINDOW = 16

    def __init__(self) -> None:
        self._recent: deque[tuple[int, float]] = deque(maxlen=self._THROUGHPUT_WINDOW)
        self.total_tokens = 0
        """Completion tokens generated since construction."""
        self.total_seconds = 0.0
        """Wall-clock seconds spent in ``generate`` since construction."""

    @abc.abstractmethod
    def load(self, policy_dir: Path | str) -> None:
        """Load the model and tokenizer of a policy directory (HF layout), replacing any."""

    @abc.abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Draw every request's samples; see the class docstring for the output order."""

    @abc.abstractmethod
    def apply_weights(self, weights: Mapping[str, torch.Tensor] | Path | str) -> None:
        """Replace the loaded model's weights in place (no restart, no new engine).

        ``weights`` is a full state dict (parameter name -> tensor, as in
        ``model.state_dict()``), a partial one (a delta already applied by the caller:
        only the named tensors change), or a policy directory whose ``*.safetensors`` hold
        a full state dict. Raises `WeightsError` when a name or shape does not fit.
        """

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """The loaded policy's tokenizer (a transformers tokenizer)."""

    @property
    @abc.abstractmethod
    def stop_token_ids(self) -> tuple[int, ...]:
        """The loaded model's end-of-turn / end-of-text ids (from its generation config)."""

    @property
    def tokens_per_second(self) -> float:
        """Completion tokens per wall-clock second over the last few ``generate`` calls."""
        tokens = sum(n for n, _ in self._recent)
        seconds = sum(s for _, s in self._recent)
        return tokens / seconds if seconds > 0 else 0.0

    def _record_throughput(self, tokens: int, seconds: float) -> None:
        self._recent.append((tokens, seconds))
        self.total_tokens += tokens
        self.total_seconds += seconds

    @staticmethod
    def _clock() -> float:
        return time.perf_counter()
