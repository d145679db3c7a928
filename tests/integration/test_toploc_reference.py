"""Compatibility of coderepair.protocol.proofs with the reference ``toploc`` 0.1.6.

The reference is compiled from its sdist by ``make .venv/.stamp-toploc-ref`` (part of
``make setup``). Under CI (CI=true) a missing reference is a failure, since CI builds
it and a skip would hide a broken set-up; elsewhere the module is skipped.

Hidden states come from a real model: a tiny random-init Llama (``transformers``,
4 layers, hidden 256, bf16, built from a config, so nothing is downloaded), generating
greedily with a KV cache as a worker does, and prefilled in one pass over prompt +
completion as a validator does.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

from coderepair.protocol.proofs import (
    FIELD_PRIME,
    ProofThresholds,
    build_proofs,
    check,
    decode_proof,
    verify_proofs,
)

if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
    import toploc  # CI builds the reference: failing to import it is a broken set-up
else:
    toploc = pytest.importorskip(
        "toploc", reason="reference not built: make .venv/.stamp-toploc-ref"
    )

import torch

transformers = pytest.importorskip("transformers")

DBS = 32
TOPK = 128
PROMPT_LEN = 20
COMPLETION_LEN = 70


def stats(results: list[Any]) -> list[tuple[int, float, float]]:
    return [(r.exp_mismatches, r.mant_err_mean, r.mant_err_median) for r in results]


# ------------------------------------------------------------------ random activations


@pytest.fixture(params=[(64, 3, 40), (256, 17, 100), (576, 9, 65)], ids=lambda p: f"h{p[0]}")
def random_activations(request: pytest.FixtureRequest) -> list[torch.Tensor]:
    hidden, prompt_len, steps = request.param
    generator = torch.Generator().manual_seed(hidden)
    prefill = torch.randn(prompt_len, hidden, generator=generator).to(torch.bfloat16)
    decode = [torch.randn(hidden, generator=generator).to(torch.bfloat16) for _ in range(steps)]
    return [prefill, *decode]


@pytest.mark.parametrize("skip_prefill", [False, True])
def test_byte_identical_to_reference(
    random_activations: list[torch.Tensor], skip_prefill: bool
) -> None:
    reference = toploc.build_proofs_bytes(random_activations, DBS, TOPK, skip_prefill)
    assert build_proofs(random_activations, skip_prefill=skip_prefill) == reference
    as_numpy = [a.float().numpy() for a in random_activations]
    assert build_proofs(as_numpy, skip_prefill=skip_prefill) == reference


def test_fp32_inputs_match_reference_on_bf16(random_activations: list[torch.Tensor]) -> None:
    """The reference refuses fp32; ours rounds to bf16 exactly as ``.to(bfloat16)``."""
    rng = np.random.default_rng(0)
    fp32 = [rng.standard_normal(tuple(a.shape)).astype(np.float32) for a in random_activations]
    reference = toploc.build_proofs_bytes(
        [torch.from_numpy(a).to(torch.bfloat16) for a in fp32], DBS, TOPK, False
    )
    assert build_proofs(fp32) == reference


def test_each_verifies_the_others_proofs(random_activations: list[torch.Tensor]) -> None:
    rng = torch.Generator().manual_seed(1)
    noisy = [
        (a.float() * (1 + 1e-2 * torch.randn(a.shape, generator=rng))).to(torch.bfloat16)
        for a in random_activations
    ]
    ours = build_proofs(random_activations)
    reference = toploc.build_proofs_bytes(random_activations, DBS, TOPK, False)
    for activations in (random_activations, noisy):
        by_reference = toploc.verify_proofs_bytes(activations, ours, DBS, TOPK, False)
        by_us = verify_proofs(activations, reference)
        assert stats(by_us) == stats(by_reference)
    exact = verify_proofs(random_activations, reference)
    assert all(s == (0, 0.0, 0.0) for s in stats(exact))


def test_large_chunk_with_reduced_modulus_matches_reference_cxx_path() -> None:
    """Chunks over 65497 values may need a smaller modulus; the reference's C++ verifier
    (tensor input, skip_prefill) reduces the index by it, as ours does."""
    generator = torch.Generator().manual_seed(3)
    activations = (torch.randn(64, 4096, generator=generator) * 0.01).to(torch.bfloat16)
    flat = activations.view(-1)
    flat[5], flat[5 + FIELD_PRIME] = 50.0, -60.0  # collide mod 65497
    reference = toploc.build_proofs_bytes(activations, DBS, TOPK, True)
    ours = build_proofs(activations, skip_prefill=True)
    assert ours == reference
    assert decode_proof(ours[0]).modulus < FIELD_PRIME
    rng = torch.Generator().manual_seed(4)
    noisy = (activations.float() * (1 + 1e-2 * torch.randn(64, 4096, generator=rng))).to(
        torch.bfloat16
    )
    for candidate in (activations, noisy):
        by_reference = toploc.verify_proofs_bytes(candidate, reference, DBS, TOPK, True)
        by_us = verify_proofs(candidate, ours, skip_prefill=True)
        # The C++ verifier takes the upper median for an even count, statistics.median
        # (the reference's Python verifier, and ours) the mean of the two middle values.
        assert [(s[0], s[1]) for s in stats(by_us)] == [(s[0], s[1]) for s in stats(by_reference)]


# ------------------------------------------------------------------ a real (tiny) model


def make_model(seed: int) -> Any:
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()


@torch.no_grad()
def generate(model: Any, prompt: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """Greedy decoding with a KV cache; the last hidden state of every forward pass."""
    out = model(prompt[None], use_cache=True, output_hidden_states=True)
    activations = [out.hidden_states[-1][0]]
    token = out.logits[0, -1].argmax()
    tokens = [int(token)]
    for _ in range(COMPLETION_LEN - 1):
        out = model(
            token.view(1, 1),
            past_key_values=out.past_key_values,
            use_cache=True,
            output_hidden_states=True,
        )
        activations.append(out.hidden_states[-1][0, -1])
        token = out.logits[0, -1].argmax()
        tokens.append(int(token))
    return activations, tokens


@torch.no_grad()
def prefill(model: Any, prompt: torch.Tensor, tokens: list[int]) -> list[torch.Tensor]:
    """The validator's view: one forward pass over prompt + completion (the last token
    was never fed to the prover's model, so its state is not part of the proof)."""
    ids = torch.cat([prompt, torch.tensor(tokens[:-1])])
    hidden = model(ids[None], output_hidden_states=True).hidden_states[-1][0]
    return [hidden[:PROMPT_LEN], *hidden[PROMPT_LEN:]]


@pytest.fixture(scope="module")
def policy() -> Any:
    return make_model(seed=0)


@pytest.fixture(scope="module", params=[0, 1, 2], ids=lambda s: f"prompt{s}")
def prompt(request: pytest.FixtureRequest) -> torch.Tensor:
    return torch.randint(
        0, 512, (PROMPT_LEN,), generator=torch.Generator().manual_seed(request.param)
    )


def verdicts(proofs: list[bytes], activations: list[torch.Tensor]) -> dict[str, bool]:
    """Pass/fail under both threshold sets; ours and the reference must measure alike."""
    ours = verify_proofs(activations, proofs)
    reference = toploc.verify_proofs_bytes(activations, proofs, DBS, TOPK, False)
    assert stats(ours) == stats(reference)
    return {
        "default": check(ours, ProofThresholds()).passed,
        "same_hardware": check(ours, ProofThresholds.same_hardware()).passed,
    }


@pytest.mark.slow
def test_honest_rollout_verifies(policy: Any, prompt: torch.Tensor) -> None:
    activations, tokens = generate(policy, prompt)
    proofs = build_proofs(activations)
    assert proofs == toploc.build_proofs_bytes(activations, DBS, TOPK, False)
    assert verdicts(proofs, prefill(policy, prompt, tokens)) == {
        "default": True,
        "same_hardware": True,
    }


@pytest.mark.slow
def test_perturbed_model_fails_same_hardware_thresholds(policy: Any, prompt: torch.Tensor) -> None:
    """1e-2 relative Gaussian noise on every weight of the prover's model.

    TOPLOC's default (cross-GPU) thresholds tolerate this much by design; the
    same-hardware thresholds catch it.
    """
    perturbed = make_model(seed=0)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for weight in perturbed.parameters():
            noise = torch.randn(weight.shape, generator=generator).to(weight.dtype)
            weight.mul_(1 + 1e-2 * noise)
    activations, tokens = generate(perturbed, prompt)
    results = verdicts(build_proofs(activations), prefill(policy, prompt, tokens))
    assert results["same_hardware"] is False


@pytest.mark.slow
def test_other_model_fails(policy: Any, prompt: torch.Tensor) -> None:
    activations, tokens = generate(make_model(seed=1), prompt)
    results = verdicts(build_proofs(activations), prefill(policy, prompt, tokens))
    assert results == {"default": False, "same_hardware": False}
