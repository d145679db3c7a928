"""The transformers engine: the protocol's seeded sampler in a tight decode loop of our own.

Runs anywhere torch runs (the default on CPU-only volunteers and in the one-machine
demo). ``model.generate()`` is not used because the protocol needs, at every step, the
per-row seed, sample index and position for its sampler, the logits it sampled from
(behaviour logprobs) and the final-norm hidden state (proofs) — all awkward to get out
of generate — and because G samples of one prompt should share one prefill. The loop does
per step one forward of the new tokens through the base model, one ``lm_head`` on the
last hidden state, the sampler, and bookkeeping.

Speed (``bench/hf_engine.py``, batch 8, 2-core CPU): on SmolLM2-135M this loop is
1.2-1.3x faster than ``generate()`` with plain multinomial sampling (65-82 vs 51-69
tok/s), on the tiny test model ~0.75x (its steps are so cheap that the sampler's
Python work shows). The tenfold gap once noted in DESIGN.md (60 vs 6 tok/s) did not
reproduce with equal thread counts; what does reproduce is oversubscription: with more
torch threads than free cores, OpenMP threads spin-wait on each other and the tiny
model ran 17x slower with 2 threads than with 1 on the busy machine (hence
``num_threads``).

What the loop does differently from ``generate()``:

* one prefill per distinct prompt of a batch (the G samples of a lease share it): left
  padding, an explicit 4-D attention mask, position ids that skip the padding; the KV
  rows are then repeated to one per sample;
* a KV cache preallocated for the batch's longest possible sequence (`_PreallocatedLayer`),
  written in place and read through views, so no step copies the cache;
* rows that stop (stop token or their ``max_new_tokens``) leave the batch at once, so
  late steps run on the rows still generating only;
* hidden states come straight from the base model (its last output is the final norm's),
  so no hook and no ``output_hidden_states`` (which would keep every layer's states).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import Cache, DynamicLayer

from coderepair.protocol.sampling import sample_tokens
from coderepair.worker.engines.base import (
    PROOF_TOPK,
    Engine,
    EngineError,
    EngineInputError,
    EngineNotLoadedError,
    Generation,
    GenerationRequest,
    GenerationTimings,
    WeightsError,
    build_completion_proofs,
)

__all__ = ["HFEngine"]


class _PreallocatedLayer(DynamicLayer):
    """A layer cache allocated once for the whole generation and filled in place.

    transformers' ``DynamicLayer`` grows by ``torch.cat`` on every token, copying the
    layer's whole cache each step; this one writes the new positions into a buffer of
    the final size and hands attention a view of the filled part.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._key_buffer = torch.empty(0)
        self._value_buffer = torch.empty(0)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, head_dim = key_states.shape
        shape = (batch, heads, self.capacity, head_dim)
        self._key_buffer = torch.empty(shape, dtype=self.dtype, device=self.device)
        self._value_buffer = torch.empty(
            (batch, heads, self.capacity, value_states.shape[-1]),
            dtype=self.dtype,
            device=self.device,
        )
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, stop = self.length, self.length + key_states.shape[-2]
        if stop > self.capacity:
            raise EngineError(f"KV cache overflow: {stop} positions > capacity {self.capacity}")
        self._key_buffer[:, :, start:stop] = key_states
        self._value_buffer[:, :, start:stop] = value_states
        self.length = stop
        self.keys = self._key_buffer[:, :, :stop]
        self.values = self._value_buffer[:, :, :stop]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._key_buffer = self._key_buffer[indices]
            self._value_buffer = self._value_buffer[indices]
            self.keys = self._key_buffer[:, :, : self.length]
            self.values = self._value_buffer[:, :, : self.length]


def _select_rows(cache: Cache, indices: torch.Tensor) -> None:
    for layer in cache.layers:
        if not isinstance(layer, _PreallocatedLayer):
            raise EngineError(f"unexpected cache layer {type(layer).__name__}")
        layer.batch_select_indices(indices)


@dataclass
class _Row:
    """One sample being generated."""

    request_index: int
    request: GenerationRequest
    seed: int
    sample_index: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"


class HFEngine(Engine):
    """Generation with transformers on CPU or GPU, ``max_batch`` samples at a time."""

    name = "hf"

    def __init__(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch: int = 8,
        num_threads: int | None = None,
    ) -> None:
        """``num_threads``: CPU threads for torch, set process-wide at ``load`` (None: torch's
        default, one per core). Give each engine process its share of the cores when several
        run on one machine: oversubscribed, torch's OpenMP threads spin-wait on each other
        and a small matmul got 20x slower here (0.44 ms with 1 thread, 8.7 ms with 2 on a
        busy 2-core machine)."""
        super().__init__()
        if max_batch < 1:
            raise EngineError(f"max_batch must be >= 1, got {max_batch}")
        if num_threads is not None and num_threads < 1:
            raise EngineError(f"num_threads must be >= 1 or None, got {num_threads}")
        self.num_threads = num_threads
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch = max_batch
        self._model: Any = None
        self._tokenizer: Any = None
        self._stop: tuple[int, ...] = ()

    # ------------------------------------------------------------ loading

    def _pin_threads(self) -> None:
        # torch.set_num_threads is per OS thread (OpenMP): the work loop calls the engine
        # from executor threads, where an unset count oversubscribes the cores (measured:
        # worker efficiency 0.81 -> 0.99 on the tiny model, bench/worker.py).
        if self.num_threads is not None and torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)

    def load(self, policy_dir: Path | str) -> None:
        self._pin_threads()
        path = Path(policy_dir)
        if not (path / "config.json").is_file():
            raise EngineError(
                f"{path} is not a model directory (no config.json): pass a directory written "
                "by save_pretrained, e.g. from coderepair.worker.models"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        # sdpa: the same kernel for the prefill and every decode step, and the one a
        # validator's prefill uses, so that proofs compare like with like.
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=self.dtype, attn_implementation="sdpa"
        )
        hidden = int(model.config.hidden_size)
        if hidden < PROOF_TOPK:
            raise EngineError(
                f"hidden size {hidden} < proof top-k {PROOF_TOPK}: a one-token proof chunk "
                "could not be built; use a model with hidden_size >= 128"
            )
        model.to(self.device).eval().requires_grad_(False)
        self._model, self._tokenizer = model, tokenizer
        self._stop = _stop_ids(model, tokenizer)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise EngineNotLoadedError("no policy loaded: call load(policy_dir) first")
        return self._tokenizer

    @property
    def model(self) -> Any:
        """The loaded transformers model (read-only use: validators, tests)."""
        if self._model is None:
            raise EngineNotLoadedError("no policy loaded: call load(policy_dir) first")
        return self._model

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        self.model  # noqa: B018  (raises if nothing is loaded)
        return self._stop

    # ------------------------------------------------------------ weights

    def apply_weights(self, weights: Mapping[str, torch.Tensor] | Path | str) -> None:
        self._pin_threads()
        model = self.model
        params = dict(model.state_dict(keep_vars=True))
        if isinstance(weights, Path | str):
            new = _load_directory(Path(weights))
            missing = set(params) - set(new) - _tied_aliases(params)
            if missing:
                raise WeightsError(
                    f"{weights} lacks {len(missing)} tensors of the loaded model (e.g. "
                    f"{sorted(missing)[:3]}): a directory must hold a full checkpoint; "
                    "pass a partial update as a state dict instead"
                )
        else:
            new = dict(weights)
        for name, tensor in new.items():
            if name not in params:
                raise WeightsError(
                    f"unknown tensor {name!r}: the loaded model has no such parameter; "
                    "the update was made for another architecture"
                )
            if not isinstance(tensor, torch.Tensor):
                raise WeightsError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise WeightsError(
                    f"{name!r} has shape {tuple(tensor.shape)}, the loaded model "
                    f"{tuple(params[name].shape)}: the update is for another model size"
                )
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise WeightsError(f"{name!r} contains inf or NaN: refusing broken weights")
        # Everything checked before anything is written: a refused update leaves the
        # loaded policy intact. copy_ keeps storage, so tied embeddings stay tied.
        with torch.no_grad():
            for name, tensor in new.items():
                params[name].copy_(tensor.to(device=self.device, dtype=params[name].dtype))

    # ------------------------------------------------------------ generation

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        self._pin_threads()
        model = self.model
        vocab = int(model.config.vocab_size)
        limit = int(getattr(model.config, "max_position_embeddings", 1 << 31))
        for index, request in enumerate(requests):
            if not isinstance(request, GenerationRequest):
                raise EngineInputError(
                    f"request {index} is a {type(request).__name__}, not a GenerationRequest"
                )
            bad = [t for t in request.prompt_ids if t >= vocab]
            if bad:
                raise EngineInputError(
                    f"request {index}: prompt token ids {bad[:5]} are outside the model's "
                    f"vocabulary of {vocab}: the prompt was tokenized for another model"
                )
            if len(request.prompt_ids) + request.params.max_new_tokens > limit:
                raise EngineInputError(
                    f"request {index}: prompt ({len(request.prompt_ids)} tokens) + "
                    f"max_new_tokens ({request.params.max_new_tokens}) exceeds the model's "
                    f"{limit} positions: shorten the prompt or lower max_new_tokens"
                )
        rows = [
            _Row(index, request, seed, sample)
            for index, request in enumerate(requests)
            for seed, sample in zip(request.seeds, request.sample_indices, strict=True)
        ]
        results: list[Generation] = []
        started = self._clock()
        for lo in range(0, len(rows), self.max_batch):
            results.extend(self._generate_batch(rows[lo : lo + self.max_batch]))
        self._record_throughput(
            sum(len(g.completion_ids) for g in results), self._clock() - started
        )
        return results

    @torch.inference_mode()
    def _generate_batch(self, rows: list[_Row]) -> list[Generation]:
        model, device = self._model, self.device
        t0 = self._clock()
        # One prefill per distinct prompt; rows of the same request share it.
        prompts: list[tuple[int, ...]] = []
        prompt_of_row: list[int] = []
        for row in rows:
            ids = row.request.prompt_ids
            if not prompts or prompts[-1] != ids:
                prompts.append(ids)
            prompt_of_row.append(len(prompts) - 1)
        width = max(len(p) for p in prompts)
        capacity = width + max(row.request.params.max_new_tokens for row in rows)
        pad = 0
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        key_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        for i, ids in enumerate(prompts):
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            key_mask[i, width - len(ids) :] = True
        input_ids, key_mask = input_ids.to(device), key_mask.to(device)
        positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
        # Padding queries attend to themselves: a query row with no visible key would
        # give NaN, and NaN in cached values poisons real rows even under a zero weight.
        mask = (causal[None] & key_mask[:, None, :]) | torch.eye(
            width, dtype=torch.bool, device=device
        )
        cache = Cache(layers=[_PreallocatedLayer(capacity) for _ in model.model.layers])
        out = model.model(
            input_ids=input_ids,
            attention_mask=mask[:, None],
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        row_index = torch.tensor(prompt_of_row, dtype=torch.long, device=device)
        hidden = out.last_hidden_state[:, -1][row_index]
        if len(prompts) != len(rows):  # repeat shared prompts' KV rows, one per sample
            _select_rows(cache, row_index)
        key_mask = key_mask[row_index]
        t1 = self._clock()

        max_new = max(row.request.params.max_new_tokens for row in rows)
        # The proved hidden rows of every sample, written in place step by step.
        hidden_rows = torch.empty(
            (len(rows), max_new, hidden.shape[-1]), dtype=hidden.dtype, device=device
        )
        # Keys of generated tokens are never padding: one mask for the whole generation,
        # sliced to the cache's length at each step.
        full_mask = torch.ones((len(rows), capacity), dtype=torch.bool, device=device)
        full_mask[:, :width] = key_mask
        active = list(range(len(rows)))
        active_index = torch.arange(len(rows), device=device)
        step = 0
        while True:
            logits = model.lm_head(hidden).float()
            tokens, logprobs = self._sample(logits, [rows[i] for i in active], step)
            hidden_rows[active_index, step] = hidden
            keep = []
            for slot, (i, token, logprob) in enumerate(
                zip(active, tokens.tolist(), logprobs.tolist(), strict=True)
            ):
                row = rows[i]
                row.tokens.append(token)
                row.logprobs.append(logprob)
                if token in row.request.params.stop_token_ids:
                    row.finish_reason = "stop"
                elif len(row.tokens) < row.request.params.max_new_tokens:
                    keep.append(slot)
            if not keep:
                break
            if len(keep) < len(active):
                keep_index = torch.tensor(keep, dtype=torch.long, device=device)
                _select_rows(cache, keep_index)
                full_mask, tokens = full_mask[keep_index], tokens[keep_index]
                active_index = active_index[keep_index]
                active = [active[slot] for slot in keep]
            position = torch.tensor(
                [[len(rows[i].request.prompt_ids) + step] for i in active], device=device
            )
            out = model.model(
                input_ids=tokens[:, None],
                attention_mask=full_mask[:, None, None, : width + step + 1],
                position_ids=position,
                past_key_values=cache,
                use_cache=True,
            )
            hidden = out.last_hidden_state[:, -1]
            step += 1
        t2 = self._clock()

        proofs = [
            build_completion_proofs(hidden_rows[i, : len(row.tokens)]) for i, row in enumerate(rows)
        ]
        t3 = self._clock()
        timings = GenerationTimings(
            prefill_s=t1 - t0, decode_s=t2 - t1, proof_s=t3 - t2, batch_rows=len(rows)
        )
        return [
            Generation(
                request_index=row.request_index,
                seed=row.seed,
                sample_index=row.sample_index,
                completion_ids=tuple(row.tokens),
                logprobs=tuple(row.logprobs),
                text=self._tokenizer.decode(row.tokens, skip_special_tokens=True),
                finish_reason="stop" if row.finish_reason == "stop" else "length",
                proofs=tuple(row_proofs),
                timings=timings,
            )
            for row, row_proofs in zip(rows, proofs, strict=True)
        ]

    @staticmethod
    def _sample(
        logits: torch.Tensor, rows: list[_Row], step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens by the protocol's sampler and their behaviour logprobs, one per row."""
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        logprobs = torch.empty(len(rows), dtype=torch.float32, device=logits.device)
        by_temperature: dict[float, list[int]] = {}
        for slot, row in enumerate(rows):
            by_temperature.setdefault(row.request.params.temperature, []).append(slot)
        for temperature, slots in by_temperature.items():
            index = torch.tensor(slots, dtype=torch.long, device=logits.device)
            part = logits[index] if len(slots) < len(rows) else logits
            chosen = _sample_group(part, [rows[s] for s in slots], step, temperature)
            tokens[index] = chosen
            if temperature == 0.0:
                logprobs[index] = 0.0  # greedy: the chosen token has all the mass
            else:
                # Same expression as protocol.sampling.behaviour_logprobs (torch path).
                logp = torch.log_softmax(part / temperature, dim=-1)
                logprobs[index] = logp.gather(-1, chosen[:, None])[:, 0]
        return tokens, logprobs


# ---------------------------------------------------------------- helpers


def _sample_group(
    logits: torch.Tensor, rows: list[_Row], step: int, temperature: float
) -> torch.Tensor:
    seeds = [row.seed for row in rows]
    if max(seeds) < 1 << 63:
        return sample_tokens(
            logits,
            seed=seeds,
            sample_index=[row.sample_index for row in rows],
            positions=[len(row.request.prompt_ids) + step for row in rows],
            temperature=temperature,
        )
    # A list holding a seed >= 2**63 goes through numpy as float64 in sampling._per_row
    # and is refused; single seeds are passed as Python ints and work. Row by row until
    # that is fixed in the protocol.
    return torch.cat(
        [
            sample_tokens(
                logits[i : i + 1],
                seed=row.seed,
                sample_index=row.sample_index,
                positions=len(row.request.prompt_ids) + step,
                temperature=temperature,
            )
            for i, row in enumerate(rows)
        ]
    )


def _stop_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list | tuple):
        ids.update(int(t) for t in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def _tied_aliases(params: Mapping[str, torch.Tensor]) -> set[str]:
    """Names that share storage with an earlier name (tied embeddings): never required."""
    seen: set[int] = set()
    aliases = set()
    for name, tensor in params.items():
        pointer = tensor.data_ptr()
        if pointer in seen:
            aliases.add(name)
        seen.add(pointer)
    return aliases


def _load_directory(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        raise WeightsError(
            f"{path} holds no *.safetensors files: pass a policy directory written by "
            "save_pretrained, or a state dict"
        )
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"{file} is not a readable safetensors file: {exc}") from exc
    return tensors
